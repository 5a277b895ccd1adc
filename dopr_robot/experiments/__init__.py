"""Experiments over many runs: sweeps of training seeds x optimizers x grid points, and their comparison.

Submodules are imported where they are used (`dopr_robot.experiments.compare`, `.stats`), so importing the
package stays cheap and `dopr_robot.evaluation` can use `stats.wilson_interval` without an import cycle.
"""
