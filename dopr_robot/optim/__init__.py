"""Optimizers: AdamW (torch), Muon and DoPr (ours). Depends on torch only:

    from dopr_robot.optim import DoPr
    optimizer = DoPr(model, lr=1e-4, base="adam")   # or base="muon"
"""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.optim.config import APConfig, OptimConfig
from dopr_robot.optim.dopr import DoPr, newton_schulz

__all__ = ["APConfig", "DoPr", "OptimConfig", "build_optimizer", "newton_schulz", "optimizer_health"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """adam: torch.optim.AdamW; muon: Muon on every Linear/Conv weight, AdamW elsewhere; dopr / dopr-muon: DoPr."""
    if cfg.name == "adam":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.name not in ("muon", "dopr", "dopr-muon"):
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    ap = cfg.ap
    return DoPr(
        model, lr=cfg.lr, base="adam" if cfg.name == "dopr" else "muon", ap=cfg.name != "muon",
        damping=ap.damping, damping_form=ap.damping_form, damping_eps=ap.eps, ema_decay=ap.ema_decay,
        refresh_every=ap.refresh_every, conv_mode=ap.conv_mode, bias_augment=ap.bias_augment,
        weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.momentum,
        nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr=cfg.adjust_lr,
    )


def optimizer_health(optimizer: torch.optim.Optimizer, spectrum: bool = False) -> dict[str, float]:
    """What the optimizer reports about itself (empty for optimizers that report nothing)."""
    return optimizer.health(spectrum) if isinstance(optimizer, DoPr) and optimizer.ap else {}
