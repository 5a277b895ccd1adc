"""Image observations in demonstration files: which keys are images, and frames read on demand.

An image key holds uint8 (T, H, W, 3) frames, rows top first (robomimic's `obs/<camera>_image`); which keys are
images is decided by `datasets.obs_keys.observation_kind` alone, from a file's dtype and shape.
Images are never loaded whole, nor expanded to float: a demo holds a `FrameRef` (file, array, step range) per
image key, and training reads the frames of each batch as uint8 (`ImageFrames.read`), converted to float only
inside the policy. Resident memory then does not grow with the number of frames in the file; read speed comes
from one-frame chunks (what `collect --cameras`, `render-obs` and `convert` write; diffusion_policy chunks its
image arrays the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dopr_robot.errors import UserError

IMAGE_SUFFIX = "_image"


def is_image_array(shape: tuple[int, ...], dtype) -> bool:
    """Whether an observation array (T, ...) of a file is an image key (`observation_kind` of one step)."""
    from dopr_robot.datasets.obs_keys import observation_kind

    return observation_kind(tuple(shape[1:]), dtype) == "image"


def split_obs_keys(keys: list[str], image_keys) -> tuple[list[str], list[str]]:
    """(low-dim keys, image keys) of `keys`, each in the given order, `image_keys` being those known to be images
    (a demo's `images`, a checkpoint's `image_shapes`)."""
    return [k for k in keys if k not in image_keys], [k for k in keys if k in image_keys]


def camera_of(key: str) -> str:
    """The camera whose frames a `<camera>_image` key holds (what collect and render-obs render for it)."""
    return key[: -len(IMAGE_SUFFIX)]


def image_key(camera: str) -> str:
    return camera + IMAGE_SUFFIX


def camera_keys(keys: list[str]) -> list[str]:
    """The keys named `<camera>_image`: those a renderer can produce (a config's keys before any file exists)."""
    return [k for k in keys if k.endswith(IMAGE_SUFFIX)]


def check_image_array(shape: tuple[int, ...], dtype: np.dtype, steps: int, where: str) -> tuple[int, int, int]:
    """The frame shape (H, W, 3) of an image array, or a one-line UserError naming what is wrong."""
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{where}: an image key must be uint8 (T, H, W, 3) (robomimic's <camera>_image); "
                        f"got {np.dtype(dtype)} {tuple(shape)}")
    if shape[0] != steps:
        raise UserError(f"{where}: has {shape[0]} frames but actions has {steps} steps")
    return tuple(int(s) for s in shape[1:])


@dataclass(frozen=True)
class FrameRef:
    """Frames start..stop-1 of the array `array` (HDF5 dataset or zarr array path) in the file `path`."""

    path: str
    array: str
    start: int
    stop: int
    frame_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self) -> np.ndarray:
        """All of this demo's frames (for conversion and copying, not for training batches)."""
        return ImageFrames([self]).read(np.arange(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # writers take a FrameRef like an array
        frames = self.read()
        return frames if dtype is None else frames.astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.frame_shape)


class ImageFrames:
    """The frames of one image key over the concatenated steps of a list of demos, read by global step index.

    Files are opened on first read, in the reading process (h5py and zarr handles do not survive a fork).
    With `in_memory` every frame is read once, up front, into one uint8 array (`data.image_cache: memory`):
    batches are then gathered from memory, at 1 byte per pixel.
    """

    def __init__(self, refs: list[FrameRef], in_memory: bool = False):
        self.refs = refs
        self.starts = np.cumsum([0] + [len(r) for r in refs])
        shapes = {r.frame_shape for r in refs}
        if len(shapes) > 1:
            raise UserError(f"{refs[0].path}: image frames of different sizes {sorted(shapes)} under one key")
        self.frame_shape = refs[0].frame_shape
        self._arrays: dict[tuple[str, str], object] = {}
        self._files: dict[str, object] = {}
        self._memory: np.ndarray | None = None
        if in_memory:
            self._memory = self.read(np.arange(len(self)))
            self.close()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _array(self, ref: FrameRef):
        key = (ref.path, ref.array)
        if key not in self._arrays:
            from dopr_robot.datasets.zarr_store import is_zarr

            if is_zarr(ref.path):
                import zarr

                self._arrays[key] = zarr.open_group(ref.path, mode="r")[ref.array]
            else:
                import h5py

                if ref.path not in self._files:
                    # no chunk cache: batches read random one-frame chunks, and HDF5's default 1 MiB cache per
                    # opened dataset (two per demo) made resident memory grow with the number of demos
                    self._files[ref.path] = h5py.File(ref.path, "r", rdcc_nbytes=0)
                self._arrays[key] = self._files[ref.path][ref.array]
        return self._arrays[key]

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 frames (*index.shape, H, W, 3) for global step indices `index`."""
        index = np.asarray(index)
        if self._memory is not None:
            return self._memory[index]
        flat = index.reshape(-1)
        out = np.empty((len(flat), *self.frame_shape), dtype=np.uint8)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        for r in np.unique(which):
            rows = np.flatnonzero(which == r)
            ref = self.refs[r]
            steps, inverse = np.unique(flat[rows] - self.starts[r] + ref.start, return_inverse=True)
            array = self._array(ref)
            if hasattr(array, "get_orthogonal_selection"):  # zarr: one call, chunk by chunk
                frames = np.asarray(array.get_orthogonal_selection((steps,)))
            else:  # h5py: single-frame reads beat its point-selection fancy indexing
                frames = np.stack([array[int(s)] for s in steps])
            out[rows] = frames[inverse]
        return out.reshape(*index.shape, *self.frame_shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._arrays.clear()

    def __getstate__(self):  # open handles stay behind; a copy reopens its own
        return {**self.__dict__, "_arrays": {}, "_files": {}}


def image_chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Chunking for an observation array: one frame per chunk for images (training reads random frames),
    the writer's default otherwise."""
    return (1, *shape[1:]) if len(shape) == 4 and shape[-1] == 3 else None


def frame_shapes(episodes, keys: list[str], path: str | Path) -> dict[str, tuple[int, int, int]]:
    """{image key: (H, W, 3)}, the same in every demo, or one UserError naming the first mix."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, episode in episodes:
        for key in keys:
            if key not in episode.images:
                continue  # a missing key is the caller's error to report
            shape = tuple(np.shape(episode.images[key])[1:])
            if shapes.setdefault(key, shape) != shape:
                raise UserError(f"dataset {path}: obs/{key} mixes image sizes ({name} is {shape[0]}x{shape[1]}, "
                                f"earlier demos {shapes[key][0]}x{shapes[key][1]}); re-render at one size")
    return shapes
