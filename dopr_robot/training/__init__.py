"""Training: the loop and the EMA of weights (checkpoints: `dopr_robot.checkpoint`)."""

from dopr_robot.training.trainer import train

__all__ = ["train"]
