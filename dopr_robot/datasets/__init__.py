"""Demonstration data: robomimic HDF5 (and zarr) files, windowing into (observation, action-chunk) samples."""

from dopr_robot.datasets.robomimic_hdf5 import Episode, RobomimicFile, write_robomimic
from dopr_robot.datasets.source import Demos, open_demos
from dopr_robot.datasets.windows import WindowDataset, flatten_obs, window_indices

__all__ = ["Demos", "open_demos", "Episode", "RobomimicFile", "write_robomimic", "WindowDataset", "flatten_obs", "window_indices"]
