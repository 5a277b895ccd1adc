"""Experiments over many runs: sweeps of training seeds x optimizers x grid points, and their comparison.

- `sweep`: the `sweep` command (validation, DIR/sweep.json, resume); `grid`: the cells and their names and
  configs; `cells`: one cell's `train`/`eval` subprocesses and when it is done; `child`: the CLI as a child that
  dies with its sweep; `launchers`: local threads, Ray or submitit.
- `compare`: the `compare` command (groups, tables, tests against a baseline); `stats`: its statistics and the
  one Wilson interval (numpy only).

Submodules are imported where they are used, so importing the package stays cheap and `dopr_robot.evaluation`
can use `stats.wilson_interval` without an import cycle.
"""
