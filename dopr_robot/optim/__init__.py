"""Optimizers: AdamW (torch), Muon and DoPr (ours). Depends on torch only:

    from dopr_robot.optim import DoPr, clip_grad_norm_
    optimizer = DoPr(model, lr=1e-4, base="adam")   # or base="muon" | "signum"
    loss.backward(); clip_grad_norm_(optimizer, model.parameters(), 10.0); optimizer.step()
"""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.optim.config import AP_OPTIMIZERS, OPTIMIZERS, APConfig, OptimConfig
from dopr_robot.optim.dopr import DoPr, fused_adamw_supported, newton_schulz

__all__ = ["AP_OPTIMIZERS", "OPTIMIZERS", "APConfig", "DoPr", "OptimConfig", "build_optimizer", "clip_grad_norm_",
           "newton_schulz", "optimizer_health"]


def build_optimizer(model: nn.Module, cfg: OptimConfig, io_layers=()) -> torch.optim.Optimizer:
    """adam: torch.optim.AdamW (fused where the device has the kernel); muon / signum: Muon / Signum on every
    Linear/Conv weight, AdamW elsewhere; dopr / dopr-muon / dopr-signum: DoPr (AP, then Adam / Muon / Signum).
    `io_layers`: the modules that read the model's raw inputs and the final projection (the caller's backbone
    names them); with cfg.matrix_layers == "hidden" their weights get AdamW under muon / signum and DoPr-Adam
    under dopr-muon / dopr-signum, with "all" the base optimizer like every other weight."""
    if cfg.name == "adam":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=fused_adamw_supported(params) or None)
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.matrix_layers not in ("hidden", "all"):
        raise ValueError(f"matrix_layers must be hidden or all; got {cfg.matrix_layers!r}")
    ap = cfg.ap
    return DoPr(
        model, lr=cfg.lr, base=cfg.name.removeprefix("dopr-") if cfg.name != "dopr" else "adam",
        ap=cfg.name in AP_OPTIMIZERS,
        damping=ap.damping, damping_form=ap.damping_form, damping_eps=ap.eps, ema_decay=ap.ema_decay,
        refresh_every=ap.refresh_every, conv_mode=ap.conv_mode, bias_augment=ap.bias_augment,
        stats_from=ap.stats_from, path=ap.path,
        adam_layers=tuple(io_layers) if cfg.matrix_layers == "hidden" else (),
        weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.momentum,
        nesterov=cfg.nesterov, ns_steps=cfg.ns_steps, adjust_lr=cfg.adjust_lr,
    )


def clip_grad_norm_(optimizer: torch.optim.Optimizer, parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ on the true gradient: DoPr layers whose .grad already holds the AP
    gradient M (its backward path) are measured by ||G|| and their M scaled like G would be. The norm is
    computed once; a caller that does not clip should not call this (the norm is work)."""
    if isinstance(optimizer, DoPr):
        return optimizer.clip_grad_norm_(parameters, max_norm)
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def optimizer_health(optimizer: torch.optim.Optimizer, spectrum: bool = False) -> dict[str, float]:
    """What the optimizer reports about itself (empty for optimizers that report nothing)."""
    return optimizer.health(spectrum) if isinstance(optimizer, DoPr) and optimizer.ap else {}
