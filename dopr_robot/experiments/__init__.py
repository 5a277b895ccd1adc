"""Experiments over many runs: `sweep` (cells = optimizer x grid point x training seed) and their comparison."""
