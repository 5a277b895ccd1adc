"""Closed-loop evaluation: seeded rollouts of a checkpoint in a reusable worker pool, journaled, with a report.

Importing this package is cheap (no torch, no robosuite): the workers import those.
"""

from dopr_robot.evaluation.evaluate import check_complete, evaluate, format_report, run_eval
from dopr_robot.evaluation.perturb import Perturbation
from dopr_robot.evaluation.pool import EpisodeSettings, EvalPool

__all__ = ["check_complete", "EpisodeSettings", "EvalPool", "Perturbation", "evaluate", "format_report", "run_eval"]
