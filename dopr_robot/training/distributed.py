"""Data-parallel training under `torchrun` (one process per device, torch.distributed from env variables).

Every rank draws the same global batch (same seeded generator), including the batch's noise and times, and
computes the loss on its contiguous share of rows; gradients are averaged across ranks, so with equal shares
the step equals the single-process step on the whole batch (DoPr all-reduces its input statistics itself).
Gradients are averaged by hand after backward instead of through DistributedDataParallel: the loss is not
the module's forward(), and DoPr's hooks must see the policy's own modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dopr_robot.errors import UserError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice | None:
        """This rank's rows of a global batch (None: all of them)."""
        if not self.enabled:
            return None
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def average_gradients(self, model: nn.Module) -> None:
        """grad <- mean over ranks, one all-reduce for all parameters."""
        if not self.enabled:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar tensor over ranks (the global batch's loss for logging and the divergence check)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def close(self) -> None:
        """Clean exit: every rank reaches the barrier, then the process group is torn down (no gloo abort)."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def is_writer() -> bool:
    """True in a single process and in torchrun's rank 0: the process that writes and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): gloo on CPU,
    nccl on CUDA, where each rank takes the GPU of its LOCAL_RANK. Without torchrun: one process, unchanged."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {rank} wants cuda:{local_rank}; only {torch.cuda.device_count()} GPUs visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Distributed(rank, world_size, local_rank), device
