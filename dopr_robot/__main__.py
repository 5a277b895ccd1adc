"""`python -m dopr_robot ...` (and `torchrun --nproc_per_node N -m dopr_robot train ...`): the `dopr-robot` CLI."""

from dopr_robot.cli import run

run()
