"""One entry point for demonstration data, whatever its format: `open_demos(path, obs_keys)` reads robomimic HDF5
files, ReplayBuffer zarr stores and Minari datasets (`minari:<dataset_id>` or a dataset directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dopr_robot.datasets.images import frame_shapes
from dopr_robot.datasets.minari_source import is_minari, read_minari, reference_scores
from dopr_robot.datasets.robomimic_hdf5 import Episode, RobomimicFile, demo_sort_key, write_robomimic
from dopr_robot.datasets.zarr_store import is_zarr, read_zarr, write_zarr
from dopr_robot.errors import UserError


class Demos:
    """The episodes of a robomimic HDF5 file, ReplayBuffer zarr store or Minari dataset, by filter key, with the
    file's env_args and attributes. Reads all low-dim data at once and closes the file; image keys are checked
    here and read on demand (datasets/images.py). `obs_keys` are the observation keys read (None: every key the
    file has)."""

    def __init__(self, path: str | Path, obs_keys: list[str] | None = None):
        self.path = Path(path)
        if is_minari(path):  # no masks: every episode trains
            self.path, self._episodes, self.env_args, self.attrs = read_minari(path, obs_keys)
            self.masks: dict[str, list[str]] = {}
        elif not self.path.exists():
            raise UserError(f"dataset not found: {self.path}")
        elif self.path.is_dir() and not is_zarr(self.path):
            raise UserError(f"dataset {self.path} is a directory, but neither a zarr store (.zgroup, zarr.json) nor "
                            f"a Minari dataset; give a robomimic .hdf5 file, a ReplayBuffer .zarr store or minari:ID")
        elif is_zarr(self.path):
            self._episodes, self.masks, self.env_args, self.attrs = read_zarr(self.path, obs_keys)
        else:
            try:
                with RobomimicFile(self.path) as f:
                    self.env_args: dict[str, Any] = f.env_args
                    self.attrs: dict[str, Any] = f.attrs
                    self.masks: dict[str, list[str]] = f.masks()
                    self._episodes: dict[str, Episode] = {name: f.read(name, obs_keys) for name in f.demos}
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
                # h5py reports a damaged file (zeroed blocks, truncation) with these, wherever the damage is hit
                reason = (str(e).splitlines()[0] if str(e) else type(e).__name__).strip("'")
                raise UserError(f"dataset {self.path} is corrupt or unreadable ({reason})") from None
        self._check_consistent()
        first = self._episodes[self.names[0]]
        # the keys as asked for (low-dim and image keys keep their order), else every key the file has
        self.obs_keys: list[str] = list(obs_keys) if obs_keys is not None else [*first.obs, *first.images]

    def _check_consistent(self) -> None:
        """Every demo has the same observation keys and widths and the same action width; every mask names
        existing demos. Checked once at open, so no command trains on, prints or converts a mixed file."""
        names = self.names
        first = self._episodes[names[0]]
        obs_widths = {k: v.shape[1:] for k, v in first.obs.items()}
        frame_shapes([(n, self._episodes[n]) for n in names], list(first.images), self.path)  # one size per key
        for name in names[1:]:
            ep = self._episodes[name]
            if set(ep.obs) | set(ep.images) != set(obs_widths) | set(first.images):
                key = sorted((set(obs_widths) | set(first.images)) ^ (set(ep.obs) | set(ep.images)))[0]
                lacking, having = (name, names[0]) if key in obs_widths or key in first.images else (names[0], name)
                raise UserError(f"dataset {self.path}: {lacking} has no observation key {key!r} ({having} has)")
            for key, width in obs_widths.items():
                if ep.obs[key].shape[1:] != width:
                    raise UserError(f"dataset {self.path}: obs/{key} of {name} is {ep.obs[key].shape[1:]}-wide, "
                                    f"of {names[0]} {width}-wide")
            if ep.actions.shape[1] != first.actions.shape[1]:
                raise UserError(f"dataset {self.path}: {name} has {ep.actions.shape[1]}-D actions, "
                                f"{names[0]} {first.actions.shape[1]}-D")
        for key, members in self.masks.items():
            missing = [n for n in members if n not in self._episodes]
            if missing:
                raise UserError(f"dataset {self.path}: mask/{key} names {missing[0]}, which is not a demo")

    @property
    def reference_scores(self) -> dict[str, float] | None:
        """The dataset's reference returns {"min", "max"} (Minari's ref_min_score / ref_max_score), if any."""
        return reference_scores(self.attrs)

    @property
    def names(self) -> list[str]:
        return sorted(self._episodes, key=demo_sort_key)

    def episodes(self, filter_key: str | None, missing_ok: bool = False) -> list[Episode]:
        if filter_key is None:
            return [self._episodes[n] for n in self.names]
        if filter_key not in self.masks:
            if missing_ok:
                return []
            if not self.masks:  # files without masks: every demo trains
                return [self._episodes[n] for n in self.names]
            raise UserError(f"dataset {self.path} has no mask/{filter_key} (has: {', '.join(self.masks)})")
        if not self.masks[filter_key] and not missing_ok:
            raise UserError(f"dataset {self.path}: mask/{filter_key} is empty (no demos to train on)")
        return [self._episodes[n] for n in self.masks[filter_key]]

    def save(self, out: str | Path) -> None:
        """Write all episodes, masks and attributes to `out` (.zarr: ReplayBuffer; otherwise robomimic HDF5)."""
        names = self.names
        index = {n: i for i, n in enumerate(names)}
        masks = {k: [index[n] for n in v if n in index] for k, v in self.masks.items()}
        episodes = [self._episodes[n] for n in names]
        if is_zarr(out):
            write_zarr(out, episodes, self.env_args, masks, self.attrs)
        else:
            write_robomimic(out, episodes, self.env_args, masks, self.attrs, compression="gzip")


def open_demos(path: str | Path, obs_keys: list[str] | None = None) -> Demos:
    return Demos(path, obs_keys)
