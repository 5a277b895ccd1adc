"""Training: the loop (`trainer`), the EMA of weights (`ema`), in-training rollouts and the last/best checkpoints
(`selection`), metrics.jsonl and its TensorBoard / W&B mirrors (`loggers`), torchrun data parallelism
(`distributed`). Checkpoint files: `dopr_robot.checkpoint`."""

from dopr_robot.training.trainer import train

__all__ = ["train"]
