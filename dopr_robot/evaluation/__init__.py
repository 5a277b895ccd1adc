"""Closed-loop evaluation: seeded rollouts of a checkpoint in a reusable worker pool, journaled, with a report.

Importing this package is cheap (no torch, no robosuite): the workers import those.
"""

from dopr_robot.evaluation.evaluate import evaluate, format_report, run_eval
from dopr_robot.evaluation.perturb import Perturbation
from dopr_robot.evaluation.pool import EpisodeSettings, EvalPool

__all__ = ["EpisodeSettings", "EvalPool", "Perturbation", "evaluate", "format_report", "run_eval"]
