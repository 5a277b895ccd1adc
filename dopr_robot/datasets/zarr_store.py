"""diffusion_policy's ReplayBuffer layout in zarr: every episode concatenated along time.

    data/action (N, A)   data/<obs key> (N, ...)   data/states (N, S)   data/reward (N,)
    data/<camera>_image (N, H, W, 3) uint8, one frame per chunk, read on demand (datasets/images.py)
    meta/episode_ends (E,) int64: cumulative end index of each episode
    root attrs: env_args (JSON string), masks ({name: [episode indices]}), episode_attrs ([{...}]), file attrs

Written in zarr format 2 (what diffusion_policy's zarr 2.x reads); a directory store, written atomically. Chunks
are Zstd frames with a content checksum, so a truncated or altered chunk fails to decode instead of reading as
other numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.datasets.images import FrameRef, check_image_array, image_chunks, is_image_array
from dopr_robot.datasets.robomimic_hdf5 import Episode
from dopr_robot.errors import UserError
from dopr_robot.fileio import out_of_space_error


def is_zarr(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".zarr" or (path.is_dir() and ((path / ".zgroup").exists() or (path / "zarr.json").exists()))


def write_zarr(path: str | Path, episodes: list[Episode], env_args: dict[str, Any],
               masks: dict[str, list[int]] | None = None, attrs: dict[str, Any] | None = None) -> None:
    import numcodecs
    import zarr

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        columns: dict[str, list[np.ndarray]] = {"action": [e.actions for e in episodes]}
        for key in episodes[0].obs:
            columns[key] = [e.obs[key] for e in episodes]
        for key in episodes[0].images:
            columns[key] = [np.asarray(e.images[key]) for e in episodes]
        if all(e.states is not None for e in episodes):
            columns["states"] = [e.states for e in episodes]
        if all(e.rewards is not None for e in episodes):
            columns["reward"] = [e.rewards for e in episodes]
        for key, parts in columns.items():
            data = np.concatenate(parts)
            # every chunk is written, even all-zero ones, so a missing chunk file always means damage
            array = root.create_array(f"data/{key}", shape=data.shape, dtype=data.dtype,
                                      chunks=image_chunks(data.shape) or (min(len(data), 4096), *data.shape[1:]),
                                      compressors=numcodecs.Zstd(level=3, checksum=True),
                                      config={"write_empty_chunks": True})
            array[:] = data
        ends = np.cumsum([len(e) for e in episodes]).astype(np.int64)
        root.create_array("meta/episode_ends", shape=ends.shape, dtype=ends.dtype)[:] = ends
        root.attrs.update({
            "env_args": json.dumps(env_args),
            "masks": {k: [int(i) for i in v] for k, v in (masks or {}).items()},
            "episode_attrs": [{k: v for k, v in e.attrs.items() if k != "model_file"} for e in episodes],
            **(attrs or {}),
        })
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise out_of_space_error(path, e) or e  # a full disk: one line; the earlier store was never touched


def zarr_obs_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape of one step, dtype)} of a store's observation arrays, from its metadata."""
    import zarr

    try:
        data = zarr.open_group(str(path), mode="r")["data"]
        return {k: (tuple(data[k].shape[1:]), np.dtype(data[k].dtype)) for k in data.keys()
                if k not in ("action", "states", "reward")}
    except (KeyError, FileNotFoundError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a ReplayBuffer zarr store (data/, meta/episode_ends): {e}") from None


def read_zarr(path: str | Path, obs_keys: list[str] | None = None):
    """(episodes, masks {name: [indices]}, env_args, attrs); `obs_keys=None` reads every observation key."""
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        data = root["data"]
        ends = _read_column(path, root["meta/episode_ends"], "meta/episode_ends", strict=True)
    except (KeyError, FileNotFoundError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a ReplayBuffer zarr store (data/, meta/episode_ends): {e}") from None
    attrs = dict(root.attrs)
    try:
        env_args = json.loads(attrs.pop("env_args"))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} has no valid 'env_args' attribute: cannot rebuild its environment") from None
    if "action" not in data:
        raise UserError(f"{path} has no data/action")
    available = sorted(k for k in data.keys() if k not in ("action", "states", "reward"))
    keys = available if obs_keys is None else obs_keys
    for key in keys:
        if key not in data:
            raise UserError(f"{path}: no observation key {key!r} (has: {', '.join(available)})")
    if len(ends) == 0 or np.any(np.diff(np.concatenate([[0], ends])) <= 0) or ends[-1] != data["action"].shape[0]:
        raise UserError(f"{path}: meta/episode_ends is not increasing or does not end at the data length")
    image_keys = [k for k in keys if is_image_array(data[k].shape, data[k].dtype)]
    keys = [k for k in keys if k not in image_keys]
    frame_shapes = {}
    for key in image_keys:  # checked here, read on demand
        array = data[key]
        if array.nchunks_initialized != array.nchunks:
            raise UserError(f"{path}: data/{key} is missing {array.nchunks - array.nchunks_initialized} of "
                            f"{array.nchunks} chunk files (they would read as zeros)")
        frame_shapes[key] = check_image_array(array.shape, array.dtype, int(ends[-1]), f"{path}: data/{key}")
    columns = {k: _read_column(path, data[k], f"data/{k}", strict=k != "reward")
               for k in [*keys, "action"] + [k for k in ("states", "reward") if k in data]}
    for key in [*keys, "action"]:
        if not np.all(np.isfinite(columns[key])):
            raise UserError(f"{path}: data/{key} contains NaN or inf")
    episode_attrs = attrs.pop("episode_attrs", [{}] * len(ends))
    masks = {k: [f"demo_{i}" for i in v] for k, v in attrs.pop("masks", {}).items()}
    episodes = {}
    starts = np.concatenate([[0], ends[:-1]])
    for i, (s, e) in enumerate(zip(starts, ends)):
        episodes[f"demo_{i}"] = Episode(
            obs={k: columns[k][s:e].astype(np.float32).reshape(e - s, -1) for k in keys},
            actions=columns["action"][s:e].astype(np.float32),
            states=columns["states"][s:e] if "states" in columns else None,
            rewards=columns["reward"][s:e] if "reward" in columns else None,
            attrs=dict(episode_attrs[i]) if i < len(episode_attrs) else {},
            images={k: FrameRef(str(path), f"data/{k}", int(s), int(e), frame_shapes[k]) for k in image_keys},
        )
    return episodes, masks, env_args, attrs


def _read_column(path: Path, array, name: str, strict: bool) -> np.ndarray:
    """All of the array `name` (data/<key>, meta/episode_ends). zarr reads a missing chunk file as fill values
    (zeros) without a word, so with `strict` every chunk must exist; a damaged chunk (truncated, garbage) is a
    one-line error. Rewards are exempt: zarr 3 writers skip all-zero chunks by default, and sparse rewards are
    mostly zero."""
    if strict and array.nchunks_initialized != array.nchunks:
        raise UserError(f"{path}: {name} is missing {array.nchunks - array.nchunks_initialized} of "
                        f"{array.nchunks} chunk files (they would read as zeros)")
    if strict:
        _check_blosc_chunk_sizes(path, array, name)
    try:
        return np.asarray(array[:])
    except Exception as e:  # codec errors have no common type (zlib/blosc/zstd, ValueError, RuntimeError...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: {name} is corrupt or unreadable ({reason})") from None


def _check_blosc_chunk_sizes(path: Path, array, name: str) -> None:
    """Blosc (diffusion_policy's and zarr's default codec) decodes a chunk by the compressed size in its own
    16-byte header and never sees the file's length, so a truncated chunk reads past its buffer: garbage or a
    crash, depending on the machine. The header's size must equal the file's."""
    if not any(type(c).__name__ in ("Blosc", "BloscCodec") for c in array.compressors):
        return
    metadata = {".zarray", ".zattrs", ".zgroup", "zarr.json"}
    for chunk in (path / name).rglob("*"):
        if not chunk.is_file() or chunk.name in metadata:
            continue
        with open(chunk, "rb") as f:
            header = f.read(16)
        stored, declared = chunk.stat().st_size, int.from_bytes(header[12:16], "little")
        if len(header) < 16 or declared != stored:
            raise UserError(f"{path}: {name} is corrupt or unreadable (chunk {chunk.relative_to(path / name)} "
                            f"is {stored} bytes, its Blosc header says {declared})")
