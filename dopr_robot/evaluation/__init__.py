"""Closed-loop evaluation: seeded rollouts of a checkpoint, in parallel, with a JSON report."""

from dopr_robot.evaluation.evaluate import evaluate, format_report
from dopr_robot.evaluation.stats import wilson_interval

__all__ = ["evaluate", "format_report", "wilson_interval"]
