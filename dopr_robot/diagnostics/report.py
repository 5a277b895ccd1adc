"""`dopr-robot diagnose RUN`: test-time-feedback diagnostics of one run, from its saved rollouts.

Inputs: RUN/eval_rollouts.hdf5 (written by `eval --save-trajectories`), the checkpoint that produced them, the
training dataset named in that checkpoint, and the eval report beside the rollouts (closed-loop success).
The space: each observation frame is flattened with `datasets.flatten_obs` over the checkpoint's obs_keys and
normalized with the checkpoint's obs normalizer, (x - center) * scale, exactly as the policy maps each frame of
its input window (the policy's condition is n_obs_steps such frames side by side).

Only rollouts that `eval --save-trajectories` wrote for a checkpoint of RUN are read (demonstrations would pass
for a perfect policy). Output: RUN/drift.json (keys in `diagnose`'s docstring) and RUN/drift.png beside it; an
earlier pair is renamed aside as eval renames its reports (drift-<time>.json / .png), never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dopr_robot.checkpoint import load_policy
from dopr_robot.datasets import flatten_obs
from dopr_robot.datasets.robomimic_hdf5 import Episode, RobomimicFile
from dopr_robot.diagnostics.demos import training_demos
from dopr_robot.diagnostics.drift import demo_band, departure_step, drift_curve, episodes_running, nearest_distances
from dopr_robot.diagnostics.openloop import open_loop_chunk_mse
from dopr_robot.diagnostics.shift import DEFAULT_RIDGE, distribution_shift
from dopr_robot.errors import UserError
from dopr_robot.evaluation.archive import archive_report
from dopr_robot.fileio import write_json
from dopr_robot.provenance import provenance
from dopr_robot.rundir import DRIFT_REPORT, ROLLOUTS_SOURCE, ROLLOUTS_SUFFIX, check_writable_dir, resolve_checkpoint

BAND_PERCENTILES = (5.0, 95.0)


def diagnose(run: str | Path, rollouts: str | Path | None = None, out: str | Path | None = None,
             checkpoint: str | Path | None = None, dataset: str | Path | None = None, seed: int = 0,
             ridge: float = DEFAULT_RIDGE, plot: bool = True) -> dict[str, Any]:
    """Compute and write the diagnostics; returns the report written to `out` (default RUN/drift.json).

    Report keys: steps, drift_mean / drift_success / drift_failure (per step; None where no such episode is
    still running), episodes_running, n_success, n_failure, demo_band [lo, hi] (5th-95th percentile of the
    demos' leave-one-demo-out nn distance), departure_step (first step with drift_mean > hi, or None),
    kl_gaussian, cov_shift, cov_logdet_ratio, shift_ridge, open_loop_chunk_mse, open_loop_windows,
    open_loop_seed, closed_loop_success, closed_loop_source, checkpoint, rollouts, dataset, provenance.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    rollouts = Path(rollouts) if rollouts is not None else run / "eval_rollouts.hdf5"
    if rollouts.is_dir():
        raise UserError(f"--rollouts {rollouts} is a directory; give the .hdf5 file `eval --save-trajectories` wrote")
    if not rollouts.is_file():
        raise UserError(f"rollouts file not found: {rollouts} (write it with `dopr-robot eval {run} "
                        f"--save-trajectories`, or pass --rollouts PATH)")
    out = Path(out) if out is not None else run / DRIFT_REPORT
    if out.suffix != ".json" or out.is_dir():
        raise UserError(f"--out must be a .json file path (the plot goes beside it as .png), got {out}")

    # --- validate and load everything before computing or writing anything
    rollout_env, recorded_ckpt, names = _rollout_header(rollouts, run)
    ckpt = _choose_checkpoint(run, checkpoint, recorded_ckpt)
    policy, meta = load_policy(ckpt)
    obs_keys, obs_dim = list(meta["obs_keys"]), int(meta["obs_dim"])
    if rollout_env.get("env_name") != meta["env_args"].get("env_name"):
        raise UserError(f"rollouts {rollouts} come from env {rollout_env.get('env_name')!r} but checkpoint {ckpt} "
                        f"was trained on {meta['env_args'].get('env_name')!r}")
    episodes = _read_rollouts(rollouts, names, obs_keys, obs_dim)
    if sum(len(e) for e in episodes) < 2:
        raise UserError(f"rollouts {rollouts} hold fewer than 2 observations: nothing to fit a distribution to")
    data_cfg = meta["config"]["data"]
    dataset, train_eps, valid_eps = training_demos(meta, ckpt, dataset)
    demo_flat = [flatten_obs(e.obs, obs_keys) for e in train_eps]
    check_writable_dir(out.parent, what="directory of --out")

    # --- the policy's input space
    center = policy.obs_normalizer.center.cpu().numpy().astype(np.float64)
    scale = policy.obs_normalizer.scale.cpu().numpy().astype(np.float64)

    def to_policy_space(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) - center) * scale

    demo_points = [to_policy_space(x) for x in demo_flat]
    rollout_points = [to_policy_space(flatten_obs(e.obs, obs_keys)) for e in episodes]
    success = [bool(e.attrs["success"]) for e in episodes]

    reference = np.concatenate(demo_points)
    distances = [nearest_distances(x, reference) for x in rollout_points]
    mean_curve = drift_curve(distances)
    band = demo_band(demo_points, BAND_PERCENTILES)
    shift = distribution_shift(np.concatenate(rollout_points), reference, ridge)
    if valid_eps:
        chunk_mse, windows = open_loop_chunk_mse(policy, valid_eps, obs_keys, data_cfg["n_action_steps"], seed)
    else:
        chunk_mse, windows = None, 0
    closed_loop, source = _closed_loop_success(rollouts, success)

    report: dict[str, Any] = {
        "steps": list(range(len(mean_curve))),
        "drift_mean": mean_curve,
        "drift_success": drift_curve(distances, success),
        "drift_failure": drift_curve(distances, [not s for s in success]),
        "episodes_running": episodes_running(distances),
        "n_success": sum(success), "n_failure": len(success) - sum(success),
        "demo_band": list(band) if band else None,
        "demo_band_percentiles": list(BAND_PERCENTILES),
        "departure_step": departure_step(mean_curve, band[1]) if band else None,
        **shift,
        "open_loop_chunk_mse": chunk_mse, "open_loop_windows": windows, "open_loop_seed": seed,
        "closed_loop_success": closed_loop, "closed_loop_source": source,
        "checkpoint": str(ckpt), "rollouts": str(rollouts), "dataset": str(dataset),
        "train_demos": len(train_eps), "valid_demos": len(valid_eps),
        "space": "per-frame observation, flatten_obs over obs_keys, then the checkpoint's obs normalizer",
        "obs_keys": obs_keys,
        "provenance": provenance(dataset, files={"rollouts": rollouts}, run_dir=run),
    }
    try:
        _archive_earlier(out)
        write_json(out, report)
        if plot:
            from dopr_robot.diagnostics.plot import plot_drift

            plot_drift(report, out.with_suffix(".png"))
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    return report


def _rollout_header(path: Path, run: Path) -> tuple[dict[str, Any], str, list[str]]:
    """(env_args, recorded checkpoint, episode names) of rollouts that `eval --save-trajectories` wrote for a
    checkpoint of `run`; anything else (demonstrations, another run's rollouts) is refused with one line."""
    with RobomimicFile(path, what="rollouts") as f:
        env_args, attrs, names = f.env_args, f.attrs, list(f.demos)
    recorded = attrs.get("checkpoint")
    if attrs.get("source") != ROLLOUTS_SOURCE or not isinstance(recorded, str):
        raise UserError(f"{path} is not a rollouts file of `dopr-robot eval --save-trajectories` (no source "
                        f"{ROLLOUTS_SOURCE!r} and checkpoint attributes; demonstrations are not rollouts)")
    own = run / "checkpoints" / Path(recorded).name
    elsewhere = Path(recorded).is_file() and Path(recorded).resolve() != own.resolve()
    if elsewhere or not own.is_file():
        raise UserError(f"rollouts {path} come from checkpoint {recorded}, which is not a checkpoint of {run}")
    return env_args, recorded, names


def _archive_earlier(out: Path) -> None:
    """An earlier report at `out` and its plot go aside as eval's reports do (`archive_report`: the report renamed
    <stem>-<its time>.json; the plot beside it under the same name, .png)."""
    plot = out.with_suffix(".png")
    archived = archive_report(out, with_journal_and_videos=False)
    if archived is not None and plot.is_file() and not archived.with_suffix(".png").exists():
        os.rename(plot, archived.with_suffix(".png"))


def _choose_checkpoint(run: Path, explicit: str | Path | None, recorded: str | None) -> Path:
    """--checkpoint, else the one the rollouts file names (as recorded, or by name in RUN/checkpoints), else
    the run's final checkpoint."""
    if explicit is not None:
        return resolve_checkpoint(explicit)
    if recorded:
        for candidate in (Path(recorded), run / "checkpoints" / Path(recorded).name):
            if candidate.is_file():
                return candidate
    return resolve_checkpoint(run)


def _read_rollouts(path: Path, names: list[str], obs_keys: list[str], obs_dim: int) -> list[Episode]:
    episodes = []
    with RobomimicFile(path, what="rollouts") as f:
        for name in names:
            group = f.data[name]
            have = sorted(group["obs"].keys()) if "obs" in group else []
            missing = [k for k in obs_keys if k not in have]
            if missing:
                raise UserError(f"rollouts {path}, {name}: no observation key(s) {', '.join(missing)} that the "
                                f"checkpoint uses (has: {', '.join(have) or 'none'})")
            episode = f.read(name, obs_keys)
            if "success" not in episode.attrs:
                raise UserError(f"rollouts {path}, {name}: no 'success' attribute (not written by "
                                f"`dopr-robot eval --save-trajectories`)")
            dim = flatten_obs(episode.obs, obs_keys).shape[1]
            if dim != obs_dim:
                raise UserError(f"rollouts {path}, {name}: observations have {dim} dims, checkpoint expects "
                                f"{obs_dim} (obs_keys {obs_keys})")
            episodes.append(episode)
    return episodes


def _closed_loop_success(rollouts: Path, success: list[bool]) -> tuple[float, str]:
    """The eval report written with these rollouts (<stem>_rollouts.hdf5 -> <stem>.json), else the rollouts'
    own success attributes (the same episodes, so the same number)."""
    report = rollouts.with_name(rollouts.name[: -len(ROLLOUTS_SUFFIX)] + ".json") \
        if rollouts.name.endswith(ROLLOUTS_SUFFIX) and rollouts.name != ROLLOUTS_SUFFIX else None
    if report is not None and report.is_file():
        try:
            return float(json.loads(report.read_text())["success_rate"]), str(report)
        except (ValueError, KeyError, TypeError):
            pass  # a damaged report: fall back to the rollouts, which hold the same outcomes
    return sum(success) / len(success), str(rollouts)
