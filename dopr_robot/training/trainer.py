"""The training loop, top to bottom: data -> policy -> optimizer -> steps -> checkpoints.

Everything the loop depends on is in `TrainerState` (weights, EMA, optimizer incl. DoPr statistics, LR
schedule, the batch/noise generator, step), saved beside the checkpoints, so a run can be resumed and every
random draw is reproducible from the seed in the run's config.yaml.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dopr_robot.collect import prepare_dataset
from dopr_robot.config import Config, dump_config
from dopr_robot.datasets import WindowDataset, flatten_obs, open_demos
from dopr_robot.datasets.images import split_obs_keys
from dopr_robot.datasets.minari_source import is_minari
from dopr_robot.datasets.obs_keys import resolve_obs_keys
from dopr_robot.envs.compat import policy_actions, to_policy_actions, version_warning
from dopr_robot.envs.gymnasium_env import is_gymnasium
from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_file, sigint_deferred, write_json, write_text
from dopr_robot.optim import build_optimizer, clip_grad_norm_, optimizer_health
from dopr_robot.progress import progress_bar
from dopr_robot.policies import RangeNormalizer, build_policy
from dopr_robot.checkpoint import save_checkpoint
from dopr_robot.provenance import run_provenance
from dopr_robot.rundir import check_run_dir, clear_run_dir, run_lock, saved_state_note
from dopr_robot.training.distributed import init_distributed
from dopr_robot.training.ema import EMA
from dopr_robot.training.selection import RolloutSelector
from dopr_robot.training.loggers import check_logger_available, open_logger

VALID_NOISE_SEED = 1234567  # validation noise is the same at every evaluation, so the curve is comparable


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def policy_for_demos(cfg: Config, train_eps, device: torch.device):
    """The policy `train` starts from: normalizers fitted on the training demos only, initial weights from
    train.seed (the same on every rank). Returns (policy, obs_dim, action_dim)."""
    d = cfg.data
    low_dim_keys, image_keys = split_obs_keys(d.obs_keys, train_eps[0].images)
    obs_all = np.concatenate([flatten_obs(e.obs, low_dim_keys, len(e)) for e in train_eps])
    act_all = np.concatenate([e.actions for e in train_eps])
    obs_dim, action_dim = obs_all.shape[1], act_all.shape[1]
    image_shapes = {k: tuple(np.shape(train_eps[0].images[k])[1:]) for k in image_keys}
    crop = cfg.policy.encoder.crop
    for key, (height, width, _) in image_shapes.items():
        if crop > min(height, width):
            raise UserError(f"policy.encoder.crop ({crop}) is larger than the {height}x{width} images of {key}")
    torch.manual_seed(cfg.train.seed)
    policy = build_policy(cfg.policy, obs_dim, action_dim, d.n_obs_steps, d.horizon,
                          RangeNormalizer.fit(obs_all, d.norm_range_floor),
                          RangeNormalizer.fit(act_all, d.norm_range_floor), image_shapes=image_shapes).to(device)
    return policy, obs_dim, action_dim


def train(cfg: Config, run_dir: str | Path, collect_if_missing: bool = False, progress: bool = True,
          resume: bool = False, until: int | None = None, overwrite: bool = False) -> Path:
    """Train per `cfg` into `run_dir`. `until` stops early at that step with a resumable state (time-sliced jobs);
    `resume` continues from the run's trainer_state.pt exactly as if it had never stopped; `overwrite` replaces
    an earlier run of this tool in `run_dir`.

    Everything (output path, dataset, resume state) is validated before the run directory is touched; under
    torchrun every rank trains on its share of each global batch and only rank 0 writes."""
    with contextlib.ExitStack() as cleanup:  # what must be released however training ends (the run lock)
        return _train(cfg, Path(run_dir), collect_if_missing, progress, resume, until, overwrite, cleanup)


def _train(cfg: Config, run_dir: Path, collect_if_missing: bool, progress: bool, resume: bool, until: int | None,
           overwrite: bool, cleanup: contextlib.ExitStack) -> Path:
    t = cfg.train
    if until is not None and until < 1:
        raise UserError(f"--until must be >= 1; got {until}")
    until = t.steps if until is None else min(until, t.steps)
    ddp, device = init_distributed(resolve_device(t.device))
    say = print if ddp.is_writer else (lambda *args, **kwargs: None)
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.batch_size % ddp.world_size:
        raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by the {ddp.world_size} processes")
    if t.warmup_steps >= t.steps:
        say(f"warning: train.warmup_steps ({t.warmup_steps}) >= train.steps ({t.steps}): "
            f"the learning rate never reaches optim.lr")
    # --- the output first: a bad --out fails before any work (and before a missing dataset is collected)
    check_logger_available(t.logger)  # a missing tensorboard/wandb package, too
    check_run_dir(run_dir, resume, overwrite, protected=[cfg.data.path])
    if ddp.is_writer:
        prepare_dataset(cfg, collect_if_missing, progress)
    if ddp.enabled:
        torch.distributed.barrier()  # the other ranks wait for rank 0's collection

    # --- data: episodes -> windows; normalization fitted on the training split only
    d = cfg.data
    if is_minari(d.path):
        keys = d.obs_keys or None  # a Minari dataset's own keys unless the config names some
    else:  # empty: the file's object key and every robot's (datasets/obs_keys.py)
        keys, keys_warning = resolve_obs_keys(d.path, d.obs_keys)
        if keys_warning:
            say(f"warning: {keys_warning}")
    demos = open_demos(d.path, keys)  # reads and checks every demo: a damaged file fails here
    d.obs_keys = demos.obs_keys  # recorded in config.yaml and the checkpoints
    train_eps = demos.episodes(d.train_filter)
    valid_eps = demos.episodes(d.valid_filter, missing_ok=True)
    env_args = demos.env_args
    if is_gymnasium(env_args):
        limit = env_args.get("max_episode_steps")
        if limit and cfg.eval.max_steps != limit:
            say(f"warning: eval.max_steps ({cfg.eval.max_steps}) is not {env_args['env_name']}'s time limit "
                f"({limit}): returns are not comparable with the dataset's (set eval.max_steps={limit})")
        if d.action_rotation != "file":
            raise UserError(f"data.action_rotation={d.action_rotation} applies to robosuite pose actions")
    else:
        # rejects action layouts the evaluator cannot execute; the checkpoint's env_args tell eval how to execute
        env_args, _, _, note = policy_actions(env_args, train_eps[0].actions, d.path, d.action_rotation)
        if note:
            say(f"note: {note}")
        to_policy_actions(demos.episodes(None), env_args)  # e.g. 7-D axis-angle poses -> 10-D with 6-D rotations
        warning = version_warning(env_args)
        if warning:
            say(f"warning: {warning}")
    train_set = WindowDataset(train_eps, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps,
                              d.image_cache).to(device)
    valid_set = WindowDataset(valid_eps, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps).to(device) \
        if valid_eps and ddp.is_writer else None
    if len(train_set) == 0:
        raise UserError(f"dataset {d.path}: the {d.train_filter!r} demos are too short for horizon {d.horizon}")

    # --- policy, EMA copy (before the optimizer attaches hooks), optimizer, schedule
    policy, obs_dim, action_dim = policy_for_demos(cfg, train_eps, device)
    ema = EMA(policy, t.ema_power, t.ema_max_decay)
    optimizer = build_optimizer(policy, cfg.optim, io_layers=policy.io_layers())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(t.warmup_steps, t.steps))
    generator = torch.Generator(device=device).manual_seed(t.seed)
    start_step = 0
    state_path = run_dir / "trainer_state.pt"
    if resume:
        start_step = load_trainer_state(state_path, device, policy, ema, optimizer, schedule, generator)
        if until <= start_step:
            what = f"--until {until}" if until < t.steps else f"train.steps ({t.steps})"
            raise UserError(f"--resume: {run_dir} is already at step {start_step}; {what} must be above it")
    meta = {"config": cfg.to_dict(), "obs_dim": obs_dim, "action_dim": action_dim, "obs_keys": list(d.obs_keys),
            "env_args": env_args, "dataset": str(d.path), "dataset_attrs": demos.attrs,
            **({"reference_scores": demos.reference_scores} if demos.reference_scores else {}),
            "train_demos": len(train_eps), "valid_demos": len(valid_eps)}
    if policy.obs_encoder is not None:  # with config.policy.encoder, what rebuilds the encoder and its eval crop
        meta["image_shapes"] = {k: list(v) for k, v in policy.obs_encoder.image_shapes.items()}

    def save(name: str, step: int) -> None:
        if not ddp.is_writer:
            return
        try:
            with sigint_deferred():  # a Ctrl-C lands after both files, never inside torch.save
                save_checkpoint(run_dir / "checkpoints", name, ema.model, {**meta, "step": step})
                with atomic_file(state_path, suffix=".pt") as f:
                    torch.save({"policy": policy.state_dict(), "ema": ema.state_dict(),
                                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                "generator": generator.get_state(), "step": step}, f)
        except UserError as e:  # a full disk: say what the run still has
            raise UserError(f"{e}; {saved_state_note(run_dir)} once there is space") from None

    # --- everything is validated: from here on the run directory is ours (locked) and written
    if ddp.is_writer:
        cleanup.enter_context(run_lock(run_dir))  # a second process on this run fails here; released on any exit
        check_run_dir(run_dir, resume, overwrite, protected=[d.path])  # again: it may have changed meanwhile
        if resume:
            truncate_metrics(run_dir / "metrics.jsonl", start_step)  # steps after the saved state are replayed
        else:
            clear_run_dir(run_dir)  # empty, or (check_run_dir) an earlier run of ours that --overwrite replaces
        write_text(run_dir / "config.yaml", dump_config(cfg))
        # a resume keeps the run's original record and appends its own to "resumes" (with the step it resumed from)
        write_json(run_dir / "provenance.json",
                   run_provenance(run_dir, demos.path, sys.argv, resume_step=start_step if resume else None))
    # metrics.jsonl (+ TensorBoard / W&B); closed however training ends
    logger = cleanup.enter_context(open_logger(t.logger, run_dir, cfg.to_dict(), start_step if resume else None)) \
        if ddp.is_writer else None

    # --- the loop
    bar = progress_bar(range(start_step, until), initial=start_step, total=t.steps, desc="train",
                       enabled=progress and ddp.is_writer)
    window_loss, window_time, window_norm, window_steps = 0.0, 0.0, 0.0, 0
    rows = ddp.shard(t.batch_size)  # this rank's rows of each global batch (None: one process, all rows)
    selector = None  # in-training rollouts on the selection seeds: checkpoints last / best
    if t.eval_every and ddp.is_writer:
        selector = RolloutSelector(run_dir, cfg)
        cleanup.callback(selector.close)  # its worker pool goes however training ends
    for step in bar:
        step_start = time.perf_counter()
        policy.train()
        obs, actions = train_set.sample(t.batch_size, generator)
        loss = policy.compute_loss(obs, actions, generator, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ddp.average_gradients(policy)
        # DoPr's clip: layers whose .grad already holds the AP gradient are measured by their true gradient
        # (||G||, not ||M||); with clipping off the norm is not computed (and not logged)
        if t.grad_clip > 0:
            window_norm += float(clip_grad_norm_(optimizer, policy.parameters(), t.grad_clip))
        optimizer.step()
        schedule.step()
        ema.update(policy)
        loss_value = ddp.mean(loss).item()
        if not math.isfinite(loss_value):
            raise UserError(f"training diverged: loss is {loss_value} at step {step + 1} (lower optim.lr?)")
        window_loss += loss_value
        window_time += time.perf_counter() - step_start
        window_steps += 1

        done = step + 1
        is_last = done == t.steps
        if ddp.is_writer and (done % t.log_every == 0 or is_last):
            n = window_steps
            record: dict[str, Any] = {"step": done, "loss": window_loss / n, "lr": schedule.get_last_lr()[0],
                                      "step_time_s": window_time / n}
            if t.grad_clip > 0:
                record["grad_norm"] = window_norm / n  # the true gradient's norm before clipping
            if valid_set is not None and (done % t.val_every == 0 or is_last):
                record["val_loss"] = validation_loss(ema.model, valid_set, device)
            if selector is not None and done % t.eval_every == 0:  # eval_every is a multiple of log_every
                record.update(selector.evaluate(done, lambda: save_checkpoint(
                    run_dir / "checkpoints", "last", ema.model, {**meta, "step": done})))
            record.update(optimizer_health(optimizer, spectrum="val_loss" in record))
            logger.log(record)
            postfix = {"loss": f"{record['loss']:.4f}"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            window_loss, window_time, window_norm, window_steps = 0.0, 0.0, 0.0, 0
        if t.checkpoint_every and done % t.checkpoint_every == 0 and not is_last and done != until:
            save(f"step_{done:07d}", done)  # periodic trainer state: a crash loses at most checkpoint_every steps
    bar.close()
    save("final" if until == t.steps else f"step_{until:07d}", until)
    ddp.close()
    return run_dir


def load_trainer_state(path: Path, device: torch.device, policy, ema, optimizer, schedule, generator) -> int:
    """Restore everything the loop depends on from trainer_state.pt; returns the step it was saved at."""
    if not path.is_file():
        raise UserError(f"--resume: {path} not found")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        policy.load_state_dict(state["policy"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        return int(state["step"])
    except (RuntimeError, KeyError, ValueError, EOFError, OSError, TypeError, AttributeError) as e:
        raise UserError(f"--resume: {path} does not match this run's config or is corrupt "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records logged after `step` (a crash after the last trainer state): resuming from `step`
    logs those steps again, and metrics.jsonl must hold each step once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the crash
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


@torch.no_grad()
def validation_loss(policy, valid_set: WindowDataset, device: torch.device, batch_size: int = 1024) -> float:
    """Mean one-step loss over every validation window, with the same noise draws at every call."""
    policy.eval()
    generator = torch.Generator().manual_seed(VALID_NOISE_SEED)  # CPU draws: one validation set on any device
    total, count = 0.0, 0
    for start in range(0, len(valid_set), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(valid_set)), device=device)
        obs, actions = valid_set.batch(rows)
        total += policy.compute_loss(obs, actions, generator).item() * len(rows)
        count += len(rows)
    return total / count
