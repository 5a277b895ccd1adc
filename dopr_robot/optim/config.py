"""Typed optimizer configuration (plain dataclasses, so `dopr_robot.optim` depends on torch alone)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class APConfig:
    """Activation-wise preconditioning (DOPR_SPEC.md): S_d = S + (damping * scale(S) + eps) I."""

    damping: float = 1.0  # gamma; relative to the mean eigenvalue of S when damping_form == "mean"
    damping_form: str = "mean"  # "mean": gamma * tr(S) / d_in; "trace": the paper's written gamma * tr(S)
    eps: float = 1e-8
    ema_decay: float = 0.0  # 0 = per-batch statistics
    refresh_every: int = 1  # recompute the damped factorization every N steps
    conv_mode: str = "channel"  # "channel" (invariant, C_in x C_in) or "full" (unfolded patches, KFC-style)
    bias_augment: bool = False  # precondition [W | b] with a constant-1 input (Linear, Conv1d in full mode only)
    stats_from: str = "batch"  # "batch" | "previous_batch" (S from the minibatch before the one it preconditions)
    # How M is computed (all exact): "auto" = fewest flops per layer and step; "primal" | "dual" | "backward" force
    # one where it is exact. Flops predict CPU time; on a GPU small factorizations are latency-bound (see README).
    path: str = "auto"


OPTIMIZERS = ("adam", "muon", "signum", "dopr", "dopr-muon", "dopr-signum")  # "dopr*": AP, then the base
AP_OPTIMIZERS = ("dopr", "dopr-muon", "dopr-signum")


@dataclass
class OptimConfig:
    name: str = "adam"  # one of OPTIMIZERS; dopr = DoPr over Adam
    lr: float = 1e-3  # the quickstart value (small MLP); diffusion_policy uses 1e-4 for its UNet
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    eps: float = 1e-8
    momentum: float = 0.95  # Muon's (Nesterov) momentum; Signum's beta (plain EMA of the gradient)
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr: str = "match_rms_adamw"  # Muon's lr scale: match_rms_adamw | original
    matrix_layers: str = "hidden"  # hidden: input/output layers get AdamW (DoPr-Adam under dopr-muon) | all
    ap: APConfig = field(default_factory=APConfig)
