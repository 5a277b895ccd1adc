"""Demonstration data: robomimic HDF5 and ReplayBuffer zarr files, windowed into (observation, action-chunk) samples."""

from dopr_robot.datasets.robomimic_hdf5 import Episode, RobomimicFile, write_robomimic
from dopr_robot.datasets.source import Demos, open_demos
from dopr_robot.datasets.windows import WindowDataset, flatten_obs, window_indices
from dopr_robot.datasets.zarr_store import is_zarr, read_zarr, write_zarr

__all__ = ["Demos", "Episode", "RobomimicFile", "WindowDataset", "flatten_obs", "is_zarr", "open_demos",
           "read_zarr", "window_indices", "write_robomimic", "write_zarr"]
