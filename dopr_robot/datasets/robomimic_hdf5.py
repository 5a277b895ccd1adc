"""Read and write robomimic-layout HDF5 files.

Layout (robomimic, also what `collect` writes and what evaluation stores for rollouts):
    data/                     attrs: total (int), env_args (JSON)
    data/demo_<i>/            attrs: num_samples, model_file, seed (ours), success (ours, rollouts)
        obs/<key>  (T, ...)   next_obs/<key>  (T, ...)
        obs/<camera>_image  (T, H, W, 3) uint8, one frame per chunk (image keys: obs only, see datasets/images.py)
        actions (T, A)  rewards (T,)  dones (T,)  states (T, S)
    mask/<filter>             array of demo names (bytes), e.g. train, valid
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from dopr_robot.datasets.images import FrameRef, check_image_array, image_chunks, is_image_array
from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_buffer


@dataclass
class Episode:
    """One demonstration or rollout. `obs[key][t]` is what the agent saw before taking `actions[t]`; image keys
    are in `images` (uint8 (T, H, W, 3) arrays, or `FrameRef`s read on demand), low-dim keys in `obs`."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray | None = None
    states: np.ndarray | None = None
    next_obs: dict[str, np.ndarray] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def demo_sort_key(name: str) -> tuple[int, str]:
    """demo_2 < demo_10; names may be sparse or non-numeric."""
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


def write_robomimic(
    path: str | Path,
    episodes: list[Episode],
    env_args: dict[str, Any],
    masks: dict[str, Iterable[int]] | None = None,
    attrs: dict[str, Any] | None = None,
    compression: str | None = None,
) -> None:
    """Write episodes as `data/demo_0..N-1` atomically. `masks` maps filter names to episode indices."""
    with atomic_buffer(path) as tmp:  # built in memory: HDF5 cannot survive a full disk (see atomic_buffer)
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for i, ep in enumerate(episodes):
                g = data.create_group(f"demo_{i}")
                T = len(ep)
                next_obs = ep.next_obs if ep.next_obs is not None else {k: _shift(v) for k, v in ep.obs.items()}
                for key, value in ep.obs.items():
                    g.create_dataset(f"obs/{key}", data=value, compression=compression)
                    g.create_dataset(f"next_obs/{key}", data=next_obs[key], compression=compression)
                for key, frames in ep.images.items():  # obs only: next_obs would double the file
                    frames = np.asarray(frames)
                    g.create_dataset(f"obs/{key}", data=frames, chunks=image_chunks(frames.shape),
                                     compression=compression)
                g.create_dataset("actions", data=ep.actions, compression=compression)
                rewards = ep.rewards if ep.rewards is not None else np.zeros(T)
                g.create_dataset("rewards", data=rewards)
                dones = np.zeros(T, dtype=np.int64)
                dones[-1] = 1
                g.create_dataset("dones", data=dones)
                if ep.states is not None:
                    g.create_dataset("states", data=ep.states, compression=compression)
                g.attrs["num_samples"] = T
                for key, value in ep.attrs.items():
                    g.attrs[key] = value
                total += T
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(env_args)
            for key, value in (attrs or {}).items():
                data.attrs[key] = value
            for name, indices in (masks or {}).items():
                f.create_dataset(f"mask/{name}", data=np.array([f"demo_{i}".encode() for i in indices], dtype="S"))


def _shift(x: np.ndarray) -> np.ndarray:
    """next_obs when only obs is known: obs[t+1], the last one repeated."""
    return np.concatenate([x[1:], x[-1:]], axis=0)


class RobomimicFile:
    """A validated, read-only view of a robomimic HDF5 file. Every problem is a one-line UserError."""

    def __init__(self, path: str | Path, what: str = "dataset"):
        """`what` names the file in error messages (e.g. "rollouts" for `eval --save-trajectories` output)."""
        self.path = Path(path)
        self.what = what
        if self.path.is_dir():
            raise UserError(f"{self.what} {self.path} is a directory; give a robomimic-layout .hdf5 file")
        if not self.path.is_file():
            raise UserError(f"{self.what} not found: {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError:
            raise UserError(f"{self.what} {self.path} is not a readable HDF5 file") from None
        if "data" not in self._f or not isinstance(self._f["data"], h5py.Group):
            self.close()
            raise UserError(f"{self.what} {self.path} has no 'data' group: not a robomimic-layout file")
        self.data = self._f["data"]
        self.demos = sorted((k for k in self.data.keys() if isinstance(self.data[k], h5py.Group)), key=demo_sort_key)
        if not self.demos:
            self.close()
            raise UserError(f"{self.what} {self.path} holds no demonstrations under 'data'")

    def __enter__(self) -> "RobomimicFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def env_args(self) -> dict[str, Any]:
        raw = self.data.attrs.get("env_args")
        if raw is None:
            raise UserError(f"{self.what} {self.path} has no data.attrs['env_args']: cannot rebuild its environment")
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            raise UserError(f"{self.what} {self.path}: data.attrs['env_args'] is not valid JSON") from None

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in self.data.attrs.items() if k != "env_args"}

    def masks(self) -> dict[str, list[str]]:
        if "mask" not in self._f:
            return {}
        return {k: sorted((n.decode() if isinstance(n, bytes) else str(n) for n in self._f["mask"][k][()]),
                          key=demo_sort_key) for k in self._f["mask"].keys()}

    def read(self, demo: str, obs_keys: list[str] | None = None) -> Episode:
        """One demo, validated; `obs_keys=None` reads every observation key."""
        g = self.data[demo]
        where = f"{self.what} {self.path}, {demo}"
        if obs_keys is None:
            obs_keys = sorted(g["obs"].keys()) if "obs" in g else []
        if "actions" not in g:
            raise UserError(f"{where}: no 'actions'")
        actions = np.asarray(g["actions"][()], dtype=np.float32)
        if actions.ndim != 2 or actions.shape[0] == 0:
            raise UserError(f"{where}: 'actions' must be a non-empty (T, A) array, got shape {actions.shape}")
        obs, images = {}, {}
        for key in obs_keys:
            if "obs" not in g or key not in g["obs"]:
                have = ", ".join(sorted(g["obs"].keys())) if "obs" in g else "none"
                raise UserError(f"{where}: no observation key {key!r} (has: {have})")
            array = g["obs"][key]
            if is_image_array(array.shape, array.dtype):  # checked here, read on demand (datasets/images.py)
                shape = check_image_array(array.shape, array.dtype, actions.shape[0], f"{where}: obs/{key}")
                images[key] = FrameRef(str(self.path), array.name, 0, actions.shape[0], shape)
                continue
            value = np.asarray(g["obs"][key][()], dtype=np.float32)
            value = value.reshape(value.shape[0], -1)
            if value.shape[0] != actions.shape[0]:
                raise UserError(f"{where}: obs/{key} has {value.shape[0]} steps but actions has {actions.shape[0]}")
            obs[key] = value
        for name, value in [("actions", actions), *obs.items()]:
            if not np.all(np.isfinite(value)):
                raise UserError(f"{where}: {name} contains NaN or inf")
        states = np.asarray(g["states"][()]) if "states" in g else None
        rewards = np.asarray(g["rewards"][()]) if "rewards" in g else None
        attrs = {k: _plain(v) for k, v in g.attrs.items()}
        return Episode(obs=obs, actions=actions, rewards=rewards, states=states, attrs=attrs, images=images)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
