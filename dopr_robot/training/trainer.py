"""The training loop, top to bottom: data -> policy -> optimizer -> steps -> checkpoints.

Everything the loop depends on is in `TrainerState` (weights, EMA, optimizer incl. DoPr statistics, LR
schedule, the batch/noise generator, step), saved beside the checkpoints, so a run can be resumed and every
random draw is reproducible from the seed in the run's config.yaml.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dopr_robot.collect import collect
from dopr_robot.config import Config, dump_config
from dopr_robot.datasets import WindowDataset, flatten_obs, open_demos
from dopr_robot.envs.compat import action_mode, version_warning
from dopr_robot.errors import UserError
from dopr_robot.fileio import atomic_path, write_text
from dopr_robot.optim import build_optimizer, optimizer_health
from dopr_robot.progress import progress_bar
from dopr_robot.policies import RangeNormalizer, build_policy
from dopr_robot.checkpoint import save_checkpoint
from dopr_robot.training.ema import EMA
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


def prepare_dataset(cfg: Config, collect_if_missing: bool, progress: bool) -> None:
    path = Path(cfg.data.path)
    if path.exists():
        return
    if not collect_if_missing:
        raise UserError(f"dataset not found: {path}")
    d = cfg.data
    noise = f" (operator noise {d.collect_noise})" if d.collect_noise else ""
    print(f"{path} not found: collecting {d.collect_episodes} scripted {d.task} demos{noise} first")
    summary = collect(d.task, d.collect_episodes, d.collect_seed, path, noise=d.collect_noise, progress=progress)
    print(f"expert success {summary['expert_success_rate']:.0%} ({summary['demos']}/{summary['attempts']}), "
          f"{summary['seconds']:.0f} s -> {path}")


def train(cfg: Config, run_dir: str | Path, collect_if_missing: bool = False, progress: bool = True,
          resume: bool = False, until: int | None = None) -> Path:
    """Train per `cfg` into `run_dir`. `until` stops early at that step with a resumable state (time-sliced jobs);
    `resume` continues from the run's trainer_state.pt exactly as if it had never stopped."""
    run_dir = Path(run_dir)
    until = cfg.train.steps if until is None else min(until, cfg.train.steps)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_logger_available(cfg.train.logger)  # a missing tensorboard/wandb package fails before anything is written
    prepare_dataset(cfg, collect_if_missing, progress)

    # --- data: episodes -> windows; normalization fitted on the training split only
    d = cfg.data
    demos = open_demos(d.path, d.obs_keys)
    train_eps = demos.episodes(d.train_filter)
    valid_eps = demos.episodes(d.valid_filter, missing_ok=True)
    env_args = demos.env_args
    action_mode(env_args, train_eps[0].actions.shape[1])  # rejects action layouts the evaluator cannot execute
    warning = version_warning(env_args)
    if warning:
        print(f"warning: {warning}")
    train_set = WindowDataset(train_eps, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps).to(device)
    valid_set = WindowDataset(valid_eps, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps).to(device) \
        if valid_eps else None
    if len(train_set) == 0:
        raise UserError(f"dataset {d.path}: the {d.train_filter!r} demos are too short for horizon {d.horizon}")
    obs_all = np.concatenate([flatten_obs(e.obs, d.obs_keys) for e in train_eps])
    act_all = np.concatenate([e.actions for e in train_eps])
    obs_dim, action_dim = obs_all.shape[1], act_all.shape[1]

    # --- policy, EMA copy (before the optimizer attaches hooks), optimizer, schedule
    torch.manual_seed(cfg.train.seed)
    policy = build_policy(cfg.policy, obs_dim, action_dim, d.n_obs_steps, d.horizon,
                          RangeNormalizer.fit(obs_all, d.norm_range_floor),
                          RangeNormalizer.fit(act_all, d.norm_range_floor)).to(device)
    ema = EMA(policy, cfg.train.ema_power, cfg.train.ema_max_decay)
    optimizer = build_optimizer(policy, cfg.optim)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.train.warmup_steps,
                                                                                cfg.train.steps))
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    start_step = 0
    state_path = run_dir / "trainer_state.pt"
    if resume:
        if not state_path.is_file():
            raise UserError(f"--resume: {state_path} not found")
        try:
            state = torch.load(state_path, map_location=device, weights_only=False)
            policy.load_state_dict(state["policy"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
            start_step = int(state["step"])
        except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
            raise UserError(f"--resume: {state_path} does not match this run's config or is corrupt "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    logger = open_logger(cfg.train.logger, run_dir, cfg.to_dict(), start_step if resume else None)
    meta = {"config": cfg.to_dict(), "obs_dim": obs_dim, "action_dim": action_dim, "obs_keys": list(d.obs_keys),
            "env_args": env_args, "dataset": str(d.path), "dataset_attrs": demos.attrs,
            "train_demos": len(train_eps), "valid_demos": len(valid_eps)}

    def save(name: str, step: int) -> None:
        save_checkpoint(run_dir / "checkpoints", name, ema.model, {**meta, "step": step})
        with atomic_path(state_path, suffix=".pt") as tmp:
            torch.save({"policy": policy.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step}, tmp)

    # --- the loop
    t = cfg.train
    bar = progress_bar(range(start_step, until), initial=start_step, total=t.steps, desc="train", enabled=progress)
    window_loss, window_time, window_norm = 0.0, 0.0, 0.0
    for step in bar:
        step_start = time.perf_counter()
        policy.train()
        obs, actions = train_set.sample(t.batch_size, generator)
        loss = policy.compute_loss(obs, actions, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        optimizer.step()
        schedule.step()
        ema.update(policy)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise UserError(f"training diverged: loss is {loss_value} at step {step + 1} (lower optim.lr?)")
        window_loss += loss_value
        window_norm += float(grad_norm)
        window_time += time.perf_counter() - step_start

        done = step + 1
        is_last = done == t.steps
        if done % t.log_every == 0 or is_last:
            n = (done - 1) % t.log_every + 1
            record: dict[str, Any] = {"step": done, "loss": window_loss / n, "grad_norm": window_norm / n,
                                      "lr": schedule.get_last_lr()[0], "step_time_s": window_time / n}
            if valid_set is not None and (done % t.val_every == 0 or is_last):
                record["val_loss"] = validation_loss(ema.model, valid_set, device)
            record.update(optimizer_health(optimizer, spectrum="val_loss" in record))
            logger.log(record)
            postfix = {"loss": f"{record['loss']:.4f}"}
            if "val_loss" in record:
                postfix["val"] = f"{record['val_loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            window_loss, window_time, window_norm = 0.0, 0.0, 0.0
        if t.checkpoint_every and done % t.checkpoint_every == 0 and not is_last:
            save(f"step_{done:07d}", done)
    bar.close()
    logger.close()
    save("final" if until == t.steps else f"step_{until:07d}", until)
    return run_dir


@torch.no_grad()
def validation_loss(policy, valid_set: WindowDataset, device: torch.device, batch_size: int = 1024) -> float:
    """Mean one-step loss over every validation window, with the same noise draws at every call."""
    policy.eval()
    generator = torch.Generator(device=device).manual_seed(VALID_NOISE_SEED)
    total, count = 0.0, 0
    for start in range(0, len(valid_set), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(valid_set)), device=device)
        obs, actions = valid_set.batch(rows)
        total += policy.compute_loss(obs, actions, generator).item() * len(rows)
        count += len(rows)
    return total / count
