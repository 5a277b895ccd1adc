"""One entry point for demonstration files, whatever their format: `open_demos(path, obs_keys)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dopr_robot.datasets.robomimic_hdf5 import Episode, RobomimicFile
from dopr_robot.errors import UserError


class Demos:
    """Episodes of a file by filter key, with the file's env_args and attributes. Reads eagerly, closes the file."""

    def __init__(self, path: str | Path, obs_keys: list[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"dataset not found: {self.path}")
        with RobomimicFile(self.path) as f:
            self.env_args: dict[str, Any] = f.env_args
            self.attrs: dict[str, Any] = f.attrs
            self._masks = f.masks()
            self._episodes = {name: f.read(name, obs_keys) for name in f.demos}

    def episodes(self, filter_key: str | None, missing_ok: bool = False) -> list[Episode]:
        if filter_key is None:
            return list(self._episodes.values())
        if filter_key not in self._masks:
            if missing_ok:
                return []
            if not self._masks:  # files without masks: every demo trains
                return list(self._episodes.values())
            raise UserError(f"dataset {self.path} has no mask/{filter_key} (has: {', '.join(self._masks)})")
        missing = [n for n in self._masks[filter_key] if n not in self._episodes]
        if missing:
            raise UserError(f"dataset {self.path}: mask/{filter_key} names {missing[0]}, which is not under data/")
        return [self._episodes[n] for n in self._masks[filter_key]]


def open_demos(path: str | Path, obs_keys: list[str]) -> Demos:
    return Demos(path, obs_keys)
