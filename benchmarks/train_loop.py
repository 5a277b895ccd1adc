"""Per-step cost of the real trainer (`dopr_robot.training.trainer.train`) as a ratio to a bare PyTorch loop on the
same policy and batch.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_loop.py [--config configs/lift.yaml] [--steps 1000]
                                                                  [--repeats 3] [--threads 1] [--optim adam]
                                                                  [--short N] [--dataset PATH] [--set key=value]
                                                                  [--device auto|cpu|cuda]
- trainer: `train(cfg, fresh run dir)` exactly as `dopr-robot train` runs it (EMA, LR schedule, loss.item() per
  step, metrics.jsonl every log_every, validation every val_every, trainer state + checkpoint every
  checkpoint_every), timed around the whole call. Start-up (dataset load, normalizers, policy build, provenance,
  final checkpoint + trainer state) is removed by differencing two runs:
      per step = (wall(train.steps = SHORT + STEPS) - wall(train.steps = SHORT)) / STEPS.
  Both runs end with the same last-step work (log + validation + final save), which cancels; what remains is
  the periodic work at the steps in (SHORT, SHORT + STEPS]. SHORT defaults to the config's log_every and STEPS
  to 1000 (the default log_every 100 / val_every 1000 / checkpoint_every 1000 all divide it), so the measured
  interval holds exactly the periodic logs, validations and checkpoints per step of a real run.
- bare: the same policy built the same way (same data, normalizers, seed, `build_optimizer` on the config's
  optim, so `--optim adam` is torch's fused AdamW), then per step: sample batch -> compute_loss -> zero_grad ->
  backward -> clip_grad_norm_ (train.grad_clip) -> optimizer.step(); no EMA, no schedule, no logging, no
  .item(). SHORT untimed warm-up steps (what the differencing drops from the trainer), then STEPS timed as one wall.
Interleaved: every repeat runs the trainer pair and the bare loop back to back (bare first in odd repeats, so slow
drift of the machine's load does not favour one side); the ratio is taken within each repeat, and the summary is
the median over repeats (per-repeat ratios listed). The dataset is the config's data.path, collected first
(outside all timings) when missing, as `dopr-robot train` does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the tree this file is in (an editable install may point elsewhere)

import torch  # noqa: E402

from dopr_robot.collect import prepare_dataset  # noqa: E402
from dopr_robot.config import Config, load_config  # noqa: E402
from dopr_robot.datasets import WindowDataset, open_demos  # noqa: E402
from dopr_robot.optim import build_optimizer, clip_grad_norm_  # noqa: E402
from dopr_robot.training.trainer import policy_for_demos, resolve_device, train  # noqa: E402


def _replace_steps(cfg: Config, steps: int) -> Config:
    from dopr_robot.config import config_from_dict

    raw = cfg.to_dict()
    raw["train"]["steps"] = steps
    return config_from_dict(raw)


def trainer_wall(cfg: Config, steps: int, root: Path) -> float:
    """Wall seconds of one `train` call with train.steps = `steps` into a fresh run directory."""
    run = Path(tempfile.mkdtemp(prefix=f"train_{steps}_", dir=root))
    shutil.rmtree(run)  # train wants a missing or empty directory; mkdtemp only picked a unique name
    cfg = _replace_steps(cfg, steps)
    gc.collect()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its warnings (warmup >= steps on short runs)
        train(cfg, run, progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(run)
    return wall


class Bare:
    """The trainer's policy and optimizer, built the same way, and the plain step."""

    def __init__(self, cfg: Config):
        t, d = cfg.train, cfg.data
        self.device = resolve_device(t.device)
        demos = open_demos(d.path, d.obs_keys)
        episodes = demos.episodes(d.train_filter)
        self.data = WindowDataset(episodes, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps).to(self.device)
        self.policy, _, _ = policy_for_demos(cfg, episodes, self.device)
        self.optimizer = build_optimizer(self.policy, cfg.optim, io_layers=self.policy.io_layers())
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        self.batch_size = t.batch_size
        self.max_norm = t.grad_clip if t.grad_clip > 0 else math.inf
        self.policy.train()

    def run(self, steps: int) -> float:
        """Wall seconds of `steps` plain steps."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            obs, actions = self.data.sample(self.batch_size, self.generator)
            loss = self.policy.compute_loss(obs, actions, self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm_(self.optimizer, self.policy.parameters(), self.max_norm)
            self.optimizer.step()
        sync()
        return time.perf_counter() - start


def bare_per_step(cfg: Config, warmup: int, steps: int) -> float:
    gc.collect()
    bare = Bare(cfg)
    bare.run(warmup)
    per_step = bare.run(steps) / steps
    del bare
    gc.collect()  # DoPr's hooks make optimizer <-> module cycles: free the model before the next run
    return per_step


def periodic_events(cfg: Config, short: int, long: int) -> str:
    """Which periodic work the differenced interval (short, long] holds, per 1000 steps."""
    t = cfg.train
    inside = lambda every: sum(1 for s in range(short + 1, long + 1) if every and s % every == 0)
    n = long - short
    logs, vals, ckpts = inside(t.log_every), inside(t.val_every), inside(t.checkpoint_every)
    return (f"interval ({short}, {long}] holds {logs} logs, {vals} validations, {ckpts} checkpoints "
            f"({1000 * logs / n:.0f} / {1000 * vals / n:.1f} / {1000 * ckpts / n:.1f} per 1000 steps; "
            f"config: log_every {t.log_every}, val_every {t.val_every}, checkpoint_every {t.checkpoint_every})")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "lift.yaml")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps: the trainer runs' difference and the "
                                                                  "bare loop's timed steps")
    parser.add_argument("--short", type=int, default=None, help="the short trainer run's steps = the bare loop's "
                                                                  "untimed warm-up (default: train.log_every)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--optim", default="adam", help="adam | muon | dopr | dopr-muon (trainer and bare loop)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (train.device)")
    parser.add_argument("--dataset", type=Path, default=None, help="overrides data.path")
    parser.add_argument("--set", dest="set_", action="append", default=[], help="any config key=value")
    args = parser.parse_args()

    overrides = [f"optim.name={args.optim}", f"train.threads={args.threads}", f"train.device={args.device}",
                 "train.eval_every=0", "train.logger=none", *args.set_]
    if args.dataset is not None:
        overrides.append(f"data.path={args.dataset}")
    cfg = load_config(args.config, overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    short = args.short if args.short is not None else cfg.train.log_every
    long = short + args.steps
    prepare_dataset(cfg, collect_if_missing=args.dataset is None, progress=True)  # outside every timing
    device = resolve_device(cfg.train.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    params = sum(p.numel() for p in Bare(cfg).policy.parameters())
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
          f"device {device} ({name}); torch {torch.__version__}, threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"config {args.config} ({cfg.policy.type}, {cfg.policy.backbone} denoiser, {params / 1e6:.1f}M parameters, "
          f"batch {cfg.train.batch_size}, optim {cfg.optim.name}), dataset {cfg.data.path}")
    print(f"trainer per step = (wall(steps={long}) - wall(steps={short})) / {args.steps}; bare: {short} warm-up + "
          f"{args.steps} timed steps; {args.repeats} repeats; {periodic_events(cfg, short, long)}", flush=True)

    trainer_ms, bare_ms, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        root = Path(tmp)
        trainer_wall(cfg, 2, root)  # untimed: first-call costs (imports, allocator) must not land on one side
        for repeat in range(args.repeats):
            def trainer() -> float:
                return (trainer_wall(cfg, long, root) - trainer_wall(cfg, short, root)) / args.steps
            if repeat % 2 == 0:
                t_step = trainer()
                b_step = bare_per_step(cfg, short, args.steps)
            else:
                b_step = bare_per_step(cfg, short, args.steps)
                t_step = trainer()
            trainer_ms.append(t_step * 1000)
            bare_ms.append(b_step * 1000)
            ratios.append(t_step / b_step)
            print(f"    repeat {repeat + 1}: trainer {trainer_ms[-1]:.2f} ms/step, bare {bare_ms[-1]:.2f} ms/step, "
                  f"{ratios[-1]:.3f}x", file=sys.stderr, flush=True)
    each = " ".join(f"{r:.3f}" for r in ratios)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print(f"| train loop / bare loop | {statistics.median(ratios):.3f}x [{each}] (trainer "
          f"{statistics.median(trainer_ms):.2f} ms/step, bare {statistics.median(bare_ms):.2f} ms/step; median of "
          f"{args.repeats}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs) |")


if __name__ == "__main__":
    main()
