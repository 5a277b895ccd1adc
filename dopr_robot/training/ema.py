"""Exponential moving average of a model's weights (diffusion_policy's schedule); evaluation uses this copy."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """decay(step) = min(1 - (1 + step)^-power, max_decay): a plain copy at step 0, slower averaging later.

    The copy is made from the model before an optimizer attaches hooks to it, is kept in eval mode and never
    requires grad, so optimizers that gather statistics in forward hooks never see its passes.
    """

    def __init__(self, model: nn.Module, power: float = 0.75, max_decay: float = 0.9999):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay = power, max_decay
        self.step = 0

    def decay(self) -> float:
        return min(max(1 - (1 + self.step) ** -self.power, 0.0), self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay()
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.step += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
