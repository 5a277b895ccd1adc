"""Offscreen rendering of a robosuite camera through MuJoCo's OpenGL backends (OSMesa or EGL).

The backend is MuJoCo's `MUJOCO_GL` environment variable, which MuJoCo and robosuite read once, when they are
imported; MuJoCo then loads that backend's library at import (so `osmesa` without libOSMesa breaks every import
of robosuite, not only rendering). `choose_gl_backend` fills it in when the user left it unset, before robosuite
is imported, and only with a backend whose library is installed:

- PYOPENGL_PLATFORM is `egl` or `osmesa`          -> the same (MuJoCo refuses a mismatch);
- an NVIDIA GPU is present and libEGL installed    -> `egl` (hardware rendering; the usual choice in Docker with
  the NVIDIA container runtime and on cluster GPU nodes);
- otherwise libOSMesa is installed                 -> `osmesa` (software rendering on any CPU machine);
- otherwise libEGL is installed                    -> `egl` (Mesa's EGL renders on the CPU too, via llvmpipe);
- otherwise it stays unset (robosuite's default; `check_rendering` then names the package to install).

A value the user set is never changed. Worker processes inherit the variable, so every process of one
evaluation renders alike.
`check_rendering` renders one real frame before any episode runs and turns a failure into one line that names
the fix.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import gc
import os
import sys
import time
import warnings
from typing import Any, NamedTuple

import numpy as np

from dopr_robot.errors import UserError

DEFAULT_CAMERA = "agentview"
DEFAULT_HEIGHT = 256
DEFAULT_WIDTH = 256
MAX_SIDE = 2048

RENDERING_FIX = ("on a Debian/Ubuntu CPU machine: apt-get install libosmesa6 and MUJOCO_GL=osmesa; "
                 "on a GPU machine or in Docker with the NVIDIA runtime: MUJOCO_GL=egl")


def render_camera(sim: Any, camera: str, height: int, width: int) -> np.ndarray:
    """One camera's view of the current simulation state: (height, width, 3) uint8, top row first (robomimic's
    convention for stored frames). Every frame this tool renders, for videos or observations, comes from here.

    After a physics step MuJoCo's body poses (xpos, xmat: what the renderer draws) are those computed before the
    step's integration, one substep behind qpos. A frame is drawn from poses recomputed from the current state
    (mj_forward), so a frame rendered during an episode equals the frame rendered after restoring that step's
    recorded state (`render-obs`, robomimic's dataset_states_to_obs). The simulation data is restored bit for bit
    afterwards: rendering changes neither the physics nor any random generator."""
    import mujoco

    model, data = sim.model._model, sim.data._data
    saved = _scratch_data(model)
    mujoco.mj_copyData(saved, model, data)
    try:
        mujoco.mj_forward(model, data)
        frame = sim.render(camera_name=camera, height=height, width=width)
    finally:
        mujoco.mj_copyData(data, model, saved)
    return np.ascontiguousarray(frame[::-1])  # OpenGL's rows run bottom-up


_SCRATCH: dict[int, Any] = {}


def _scratch_data(model: Any) -> Any:
    """One spare MjData per model, reused for every frame (allocating one per frame would dominate small frames)."""
    import mujoco

    key = id(model)
    if key not in _SCRATCH or _SCRATCH[key][0] is not model:
        _SCRATCH.clear()  # one live model per process at a time is the rule here; do not keep old ones alive
        _SCRATCH[key] = (model, mujoco.MjData(model))
    return _SCRATCH[key][1]


class ImageSpec(NamedTuple):
    """Image observations: cameras rendered at every observation, each as `<camera>_image`."""

    cameras: tuple[str, ...]
    height: int
    width: int

    def render(self, sim: Any) -> dict[str, np.ndarray]:
        from dopr_robot.datasets.images import image_key

        return {image_key(c): render_camera(sim, c, self.height, self.width) for c in self.cameras}

    @classmethod
    def from_image_shapes(cls, image_shapes: dict[str, Any]) -> "ImageSpec | None":
        """The spec that renders a checkpoint's image keys ({<camera>_image: [H, W, 3]}) at their size."""
        if not image_shapes:
            return None
        from dopr_robot.datasets.images import camera_of

        sizes = {tuple(v[:2]) for v in image_shapes.values()}
        if len(sizes) > 1:
            raise UserError(f"image keys of different sizes {sorted(sizes)}: one environment renders one size")
        (height, width), = sizes
        return cls(tuple(camera_of(k) for k in sorted(image_shapes)), int(height), int(width))


def image_attrs(spec: ImageSpec) -> dict[str, Any]:
    """What a demonstration file records about its rendered images (data.attrs)."""
    import json

    return {"image_cameras": json.dumps(list(spec.cameras)), "image_height": spec.height, "image_width": spec.width}


def parse_cameras(text: str) -> tuple[str, ...]:
    """`agentview,robot0_eye_in_hand` -> ("agentview", "robot0_eye_in_hand")."""
    cameras = tuple(c.strip() for c in text.split(",") if c.strip())
    if not cameras or len(set(cameras)) != len(cameras):
        raise UserError(f"--cameras {text!r}: give distinct camera names separated by commas, "
                        f"e.g. agentview,robot0_eye_in_hand")
    return cameras


def check_image_size(size: int) -> int:
    if not 8 <= size <= MAX_SIDE:
        raise UserError(f"--image-size / --size must be in 8..{MAX_SIDE} pixels; got {size}")
    return size


class RenderSpec(NamedTuple):
    """What to render: a camera of the robosuite model and the frame size in pixels."""

    camera: str = DEFAULT_CAMERA
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH


def parse_size(text: str) -> tuple[int, int]:
    """`N` (square) or `WxH` (width x height, as video sizes are written) -> (height, width).

    Both sides must be even: MP4's usual yuv420p pixel format halves the chroma resolution.
    """
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise UserError(f"video size {text!r} is not N or WIDTHxHEIGHT (e.g. 256 or 320x240)")
    width, height = sides[0], sides[-1]
    for side in (width, height):
        if not (16 <= side <= MAX_SIDE and side % 2 == 0):
            raise UserError(f"video size {text!r}: each side must be an even number of pixels in 16..{MAX_SIDE}")
    return height, width


def _nvidia_gpu_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus")


def choose_gl_backend() -> str:
    """Set `MUJOCO_GL` when it is unset (see the module docstring) and return the backend in effect."""
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if chosen:
        return chosen
    platform = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
    has_egl = ctypes.util.find_library("EGL") is not None
    if platform in ("egl", "osmesa"):
        chosen = platform
    elif has_egl and _nvidia_gpu_present():
        chosen = "egl"
    elif ctypes.util.find_library("OSMesa"):
        chosen = "osmesa"
    elif has_egl:
        chosen = "egl"
    else:
        return "(unset)"
    os.environ["MUJOCO_GL"] = chosen
    return chosen


def backend_import_error(error: BaseException) -> UserError:
    """The one-line error for an import of MuJoCo/robosuite that failed under the MUJOCO_GL in effect."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return UserError(f"importing MuJoCo/robosuite failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')} "
                     f"({type(error).__name__}{': ' + detail if detail else ''}); unset MUJOCO_GL, or {RENDERING_FIX}")


def active_gl_backend() -> str:
    """The backend robosuite actually uses: the one it read at import, else the one it will read."""
    binding = sys.modules.get("robosuite.utils.binding_utils")
    if binding is not None:
        return getattr(binding, "_MUJOCO_GL", "") or "egl"
    return os.environ.get("MUJOCO_GL", "") or "(unset)"


@contextlib.contextmanager
def _quiet():
    """Silence what a failing GL backend prints besides its exception (GLFW/EGL warnings, and the destructor of
    robosuite's half-built render context), so a failed check is the one line of its UserError."""
    hook = sys.unraisablehook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.unraisablehook = lambda unraisable: None
        try:
            yield
        finally:
            gc.collect()  # the half-built context is destroyed here, while its complaints are ignored
            sys.unraisablehook = hook


def check_rendering(env_args: dict[str, Any], spec: RenderSpec, seed: int = 0) -> float:
    """Build the environment with its offscreen renderer and render one frame of `spec.camera`.

    Returns the seconds that frame took. Raises UserError (one line naming the fix) when rendering does not
    work here, or when the frame is blank (a context that renders nothing), and for an unknown camera.
    """
    from dopr_robot.envs import make_env

    env, failure = None, None
    with _quiet():
        try:
            env = make_env(env_args, render=spec)
            env.reset(seed)
            start = time.perf_counter()
            frame = env.render_frame()
            seconds = time.perf_counter() - start
        except UserError:
            raise
        except Exception as e:  # ImportError (no libOSMesa/libEGL), GL context errors, mujoco.FatalError, ...
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            failure = f"{type(e).__name__}{': ' + detail if detail else ''}"
        finally:
            if env is not None:
                env.close()
            env = None
    if failure is not None:
        raise UserError(f"offscreen rendering does not work here (MUJOCO_GL={active_gl_backend()}: {failure}); "
                        f"{RENDERING_FIX}")
    if frame.shape != (spec.height, spec.width, 3) or int(frame.max()) == int(frame.min()):
        raise UserError(f"offscreen rendering returned a blank {frame.shape} frame (MUJOCO_GL="
                        f"{active_gl_backend()}); {RENDERING_FIX}")
    return seconds
