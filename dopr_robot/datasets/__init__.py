"""Demonstration data: robomimic HDF5, ReplayBuffer zarr and Minari files, windowed into (observation, action-chunk)
samples.

The names below are imported on first use (PEP 562), so that importing one light submodule (`obs_keys`,
`images`: numpy only, what an evaluation worker needs) does not import h5py, zarr and torch with the package."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Episode": "robomimic_hdf5", "RobomimicFile": "robomimic_hdf5", "write_robomimic": "robomimic_hdf5",
    "Demos": "source", "open_demos": "source",
    "WindowDataset": "windows", "window_indices": "windows",
    "flatten_obs": "obs_keys",
    "is_zarr": "zarr_store", "read_zarr": "zarr_store", "write_zarr": "zarr_store",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
