"""Experiments over many runs: sweeps of training seeds x optimizers x grid points, and their comparison.

- `sweep`: the `sweep` command (validation, DIR/sweep.json, resume); `grid`: the cells and their names and
  configs; `cells`: one cell's `train`/`eval` subprocesses and when it is done; `child`: the CLI as a child that
  dies with its sweep; `launchers`: local threads, Ray or submitit.
- `compare`: the `compare` command (a package: runs, groups, their statistics, tables). Its statistics are
  `dopr_robot.stats` (numpy only), below evaluation and plotting, so that a run never imports this package.

Submodules are imported where they are used, so importing the package stays cheap.
"""
