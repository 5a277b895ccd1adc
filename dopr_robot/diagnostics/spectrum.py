"""`dopr-robot spectrum RUN`: what AP's damping leaves of each layer's preconditioner, for a trained policy.

DoPr preconditions a layer with S_d = S + lambda I, S = Z^T Z / n the uncentered second moment of the layer's
input rows on one training batch and lambda = gamma tr(S) / d_in (+ eps; "mean" form). On a batch of training
windows sampled as training samples them (the run's batch size, seeded), for every layer DoPr would precondition
(`DoPr.layers`, rows exactly as DoPr forms them), this reports, averaged over `batches` batches:

    lambda_max / mean eigenvalue   = d_in * top_share; gamma_mean near this value leaves cond(S_d) about 2
    top_share = lambda_max / tr(S)  1/d_in for isotropic inputs, 1 when one direction (often the mean) dominates
    cond(S_d) at a gamma            (lambda_max + lambda) / (lambda_min + lambda): how far AP is from a scaled
                                    identity, i.e. from the base optimizer alone (Adam ignores the scale)

So it says where a damping sweep reaches "DoPr-Adam = AdamW": only when gamma_mean passes lambda_max / mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dopr_robot.checkpoint import load_policy
from dopr_robot.config import config_from_dict
from dopr_robot.datasets import WindowDataset
from dopr_robot.diagnostics.demos import training_demos
from dopr_robot.errors import UserError
from dopr_robot.fileio import write_json
from dopr_robot.optim import AP_OPTIMIZERS, DoPr
from dopr_robot.optim.dopr import damping
from dopr_robot.provenance import provenance
from dopr_robot.rundir import SPECTRUM_REPORT, check_writable_dir, resolve_checkpoint


@torch.no_grad()
def layer_spectra(policy, windows: WindowDataset, layers, batch_size: int, batches: int, seed: int,
                  gammas: list[float], damping_form: str, eps: float) -> list[dict[str, Any]]:
    """Per layer (in `layers`' order): name, d_in, rows per batch, lambda_max/mean, top_share and
    cond_damped {gamma: cond(S_d)}, each the mean over `batches` seeded batches of the policy's training loss
    forward pass."""
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(layer):
        def hook(module, inputs, output):  # a layer called twice in one forward: both calls' rows, as DoPr's S
            captured.setdefault(layer.name, []).append(layer.rows(inputs[0]).double())
        return hook

    hooks = [layer.module.register_forward_hook(capture(layer)) for layer in layers]
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, Any]] = {}
    try:
        policy.eval()
        for _ in range(batches):
            obs, actions = windows.sample(batch_size, generator)
            policy.compute_loss(obs, actions, generator)
            for layer in layers:
                rows = torch.cat(captured.pop(layer.name))
                eig = torch.linalg.eigvalsh(rows.T @ rows / rows.shape[0])
                trace, top, bottom = eig.sum(), eig[-1].item(), max(eig[0].item(), 0.0)
                entry = sums.setdefault(layer.name, {"name": layer.name, "d_in": layer.d_in, "rows": rows.shape[0],
                                                     "lambda_max_over_mean": 0.0, "top_share": 0.0,
                                                     "cond_damped": {g: 0.0 for g in gammas}})
                entry["lambda_max_over_mean"] += top * layer.d_in / trace.item() / batches
                entry["top_share"] += top / trace.item() / batches
                for g in gammas:
                    lam = float(damping(trace, layer.d_in, g, damping_form, eps))
                    entry["cond_damped"][g] += (top + lam) / (bottom + lam) / batches
    finally:
        for h in hooks:
            h.remove()
    return [sums[layer.name] for layer in layers]


def spectrum(run: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None,
             dataset: str | Path | None = None, gammas: list[float] | None = None, batches: int = 4,
             seed: int = 0) -> dict[str, Any]:
    """Compute and write RUN/spectrum.json (or `out`); `gammas` defaults to the run's own damping (for a run
    without AP, the DoPr default). Returns the report."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    out = Path(out) if out is not None else run / SPECTRUM_REPORT
    if out.suffix != ".json" or out.is_dir():
        raise UserError(f"--out must be a .json file path, got {out}")
    if batches < 1:
        raise UserError(f"--batches must be >= 1, got {batches}")
    if gammas is not None and not all(0 <= g < math.inf for g in gammas):  # NaN fails every comparison
        raise UserError(f"--gamma values must be finite and >= 0, got {gammas}")
    ckpt = resolve_checkpoint(Path(checkpoint) if checkpoint is not None else run)
    policy, meta = load_policy(ckpt)
    cfg = config_from_dict(meta["config"])
    dataset, train_eps, _ = training_demos(meta, ckpt, dataset)
    check_writable_dir(out.parent, what="directory of --out")

    ap = cfg.optim.ap
    gammas = sorted(set(gammas if gammas else [ap.damping]))
    # the layers (and their rows) DoPr would precondition under this run's AP settings; ap=False: no hooks
    layers = DoPr(policy, ap=False, conv_mode=ap.conv_mode, bias_augment=ap.bias_augment).layers
    windows = WindowDataset(train_eps, list(meta["obs_keys"]), policy.n_obs_steps, policy.horizon,
                            cfg.data.n_action_steps)
    rows = layer_spectra(policy, windows, layers, cfg.train.batch_size, batches, seed, gammas, ap.damping_form, ap.eps)
    report = {
        "layers": [{**r, "cond_damped": {str(g): c for g, c in r["cond_damped"].items()}} for r in rows],
        "gammas": gammas, "damping_form": ap.damping_form, "run_optim": cfg.optim.name,
        "run_damping": ap.damping if cfg.optim.name in AP_OPTIMIZERS else None,
        "batches": batches, "batch_size": cfg.train.batch_size, "seed": seed,
        "checkpoint": str(ckpt), "dataset": str(dataset),
        "provenance": provenance(dataset, run_dir=run),
    }
    try:
        write_json(out, report)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return report
