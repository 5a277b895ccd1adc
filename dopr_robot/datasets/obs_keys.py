"""Which observation keys a policy reads: image or low-dim, and the default low-dim keys of a file.

An observation key is an *image* when one step of it is a uint8 (H, W, C) array (robomimic's
`obs/<camera>_image`, (T, H, W, 3) per demo); everything else is *low-dim* and is flattened into the policy's
input vector. `observation_kind` is the one place that decides, for every reader and the image encoder alike.

Default keys (an empty `data.obs_keys`) follow the file, not one task: its object key and, for every robot the
file records (`robot0_*`, `robot1_*`, ...), the end effector's position and quaternion and the gripper's joint
positions, diffusion_policy's low-dim keys for robomimic (Lift 19-D, Tool-Hang 53-D, Transport 59-D). Files
without those keys default to all their low-dim keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dopr_robot.errors import UserError

ROBOT_KEYS = ("eef_pos", "eef_quat", "gripper_qpos")
_ROBOT = re.compile(r"^robot(\d+)_")


def flatten_obs(obs: dict[str, np.ndarray], obs_keys: list[str], steps: int | None = None) -> np.ndarray:
    """Concatenate the chosen (low-dim) observation keys along the last axis, in the given order. With no keys
    (an image-only policy) a (steps, 0) array."""
    if not obs_keys:
        return np.zeros((steps or 0, 0), dtype=np.float32)
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(len(obs[k]), -1) for k in obs_keys], axis=-1)


def observation_kind(step_shape: tuple[int, ...], dtype) -> str:
    """"image" for a uint8 (H, W, C) step, else "low_dim"."""
    return "image" if np.dtype(dtype) == np.uint8 and len(step_shape) == 3 else "low_dim"


def obs_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape of one step, dtype)} of a file's observations, from its metadata (no data is read)."""
    from dopr_robot.datasets.robomimic_hdf5 import RobomimicFile
    from dopr_robot.datasets.zarr_store import is_zarr, zarr_obs_specs

    if not Path(path).exists():
        raise UserError(f"dataset not found: {path}")
    if is_zarr(path):
        return zarr_obs_specs(path)
    try:
        with RobomimicFile(path) as f:
            group = f.data[f.demos[0]]
            obs = group["obs"] if "obs" in group else {}
            return {k: (tuple(obs[k].shape[1:]), obs[k].dtype) for k in obs.keys()}
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        reason = (str(e).splitlines()[0] if str(e) else type(e).__name__).strip("'")
        raise UserError(f"dataset {path} is corrupt or unreadable ({reason})") from None


def robots_of(keys) -> list[int]:
    """The robot indices that observation keys name (robot0_eef_pos -> 0), sorted."""
    return sorted({int(m.group(1)) for k in keys if (m := _ROBOT.match(k))})


def default_obs_keys(specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[str]:
    low_dim = [k for k, (shape, dtype) in specs.items() if observation_kind(shape, dtype) == "low_dim"]
    keys = ["object"] if "object" in low_dim else []
    keys += [f"robot{i}_{name}" for i in robots_of(low_dim) for name in ROBOT_KEYS if f"robot{i}_{name}" in low_dim]
    return keys if keys else sorted(low_dim)


def resolve_obs_keys(path: str | Path, requested: list[str]) -> tuple[list[str], str | None]:
    """(the keys to train on, low-dim and image alike, a warning line or None). `requested` empty: the file's
    low-dim defaults. An explicit list that leaves out a robot the file records gets a warning (Transport without
    robot1_* is half blind). Image keys go to the image encoder (policies/encoder.py), never flattened."""
    specs = obs_specs(path)
    if not requested:
        keys = default_obs_keys(specs)
        if not keys:
            raise UserError(f"dataset {path} has no low-dim observation keys to train on")
        return keys, None
    left_out = [i for i in robots_of(specs) if i not in robots_of(requested)]
    warning = None
    if left_out:
        names = ", ".join(f"robot{i}_*" for i in left_out)
        warning = (f"data.obs_keys has no {names} key though {path} records robot(s) {left_out}: the policy will not "
                   f"observe {'them' if len(left_out) > 1 else 'it'} (defaults: {', '.join(default_obs_keys(specs))})")
    return list(requested), warning
