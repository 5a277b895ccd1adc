"""The Wilson interval used by eval reports; its one implementation lives in `dopr_robot.experiments.stats`."""

from dopr_robot.experiments.stats import wilson_interval

__all__ = ["wilson_interval"]
