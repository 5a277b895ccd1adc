"""Image training data: is loading what bounds a training step, and does resident memory grow with the dataset?

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/image_loader.py [--config configs/lift_image.yaml]
          [--dataset PATH] [--demos 20] [--scales 1,4,16] [--repeats 20] [--rss-steps 20] [--threads 1]

- Data: a rendered Lift image dataset (`--dataset`, else `--demos` scripted demos collected with the config's
  cameras at data.collect_image_size into a cache directory, outside all timings). Larger datasets for the
  scaling rows repeat those demos (real rendered frames, copied chunk for chunk: h5py's copy), `--scales` times.
- Step: the config's policy and optimizer built as `train` builds them, one whole training step (sample + loss +
  backward + clip + optimizer step) on the base dataset. Loader: `WindowDataset.sample` alone (window indices ->
  low-dim rows + uint8 frames read from the file, or from memory with data.image_cache=memory) on each scaled
  dataset (more demos: fewer repeated frames per batch). Medians of wall and CPU (process) time: on a shared
  machine the CPU time is the one to compare.
- Peak RSS: `dopr-robot train` on each scaled file in a child process (`--rss-steps` steps, no validation),
  peak resident set size from the child's rusage (ru_maxrss), beside what the frames would take held in memory
  as uint8 and as float32.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure the tree this file is in

import h5py  # noqa: E402
import torch  # noqa: E402

from dopr_robot.config import load_config  # noqa: E402
from dopr_robot.datasets import WindowDataset, open_demos  # noqa: E402
from dopr_robot.optim import build_optimizer, clip_grad_norm_  # noqa: E402
from dopr_robot.collect import prepare_dataset  # noqa: E402
from dopr_robot.training.trainer import policy_for_demos  # noqa: E402


def scaled_copy(base: Path, factor: int, out: Path) -> Path:
    """`base` with its demos repeated `factor` times (demo_<i + k * n>), every demo training."""
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp.hdf5")
    with h5py.File(base, "r") as src, h5py.File(tmp, "w") as dst:
        names = sorted(src["data"], key=lambda n: int(n.split("_")[-1]))
        data = dst.create_group("data")
        for key, value in src["data"].attrs.items():
            data.attrs[key] = value
        total = 0
        for k in range(factor):
            for i, name in enumerate(names):
                src.copy(src["data"][name], data, name=f"demo_{i + k * len(names)}")
                total += int(src["data"][name].attrs["num_samples"])
        data.attrs["total"] = total
    os.replace(tmp, out)
    return out


def frame_count(path: Path, image_keys: list[str]) -> tuple[int, int]:
    """(frames, bytes as uint8) of the image keys in `path`."""
    with h5py.File(path, "r") as f:
        arrays = [f["data"][d]["obs"][k] for d in f["data"] for k in image_keys]
        return sum(a.shape[0] for a in arrays), sum(a.size for a in arrays)


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (wall ms, CPU ms) of `fn()` over `repeats` calls, after two warm-up calls."""
    walls, cpus = [], []
    for i in range(repeats + 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if i >= 2:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def windows_of(cfg, path: Path) -> WindowDataset:
    d = cfg.data
    episodes = open_demos(path, d.obs_keys).episodes(None)
    return WindowDataset(episodes, d.obs_keys, d.n_obs_steps, d.horizon, d.n_action_steps, d.image_cache)


def loader_ms(cfg, path: Path, repeats: int) -> tuple[float, float]:
    """(wall, CPU) ms of one batch: window indices -> low-dim rows + uint8 frames (from the file or memory)."""
    train_set = windows_of(cfg, path)
    generator = torch.Generator().manual_seed(0)
    return timed(lambda: train_set.sample(cfg.train.batch_size, generator), repeats)


def step_ms(cfg, repeats: int) -> tuple[float, float]:
    """(wall, CPU) ms of one whole training step (sample + loss + backward + clip + optimizer step)."""
    train_set = windows_of(cfg, Path(cfg.data.path))
    episodes = open_demos(cfg.data.path, cfg.data.obs_keys).episodes(None)
    policy, _, _ = policy_for_demos(cfg, episodes, torch.device("cpu"))
    optimizer = build_optimizer(policy, cfg.optim, io_layers=policy.io_layers())
    generator = torch.Generator().manual_seed(0)
    policy.train()

    def step():
        obs, actions = train_set.sample(cfg.train.batch_size, generator)
        loss = policy.compute_loss(obs, actions, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(optimizer, policy.parameters(), cfg.train.grad_clip)
        optimizer.step()
    return timed(step, repeats)


def peak_rss_of_training(config: Path, dataset: Path, steps: int, threads: int, sets: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `dopr-robot train` on `dataset` in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "dopr_robot.cli", "train", "--config", str(config), "--dataset", str(dataset),
                "--out", str(Path(tmp) / "run"), "--steps", str(steps), "--set", "data.valid_filter=none",
                "--set", "train.warmup_steps=1", "--set", f"train.log_every={steps}",
                "--set", f"train.threads={threads}", "--set", "train.checkpoint_every=0"]
        for item in sets:
            args += ["--set", item]
        start = time.perf_counter()
        child = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"training on {dataset} failed: {child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "lift_image.yaml")
    p.add_argument("--dataset", type=Path, default=None)
    p.add_argument("--demos", type=int, default=20)
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--rss-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dopr_image_loader_bench")
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base = a.dataset or a.cache / f"lift_image_{a.demos}.hdf5"
    cfg = load_config(a.config, [f"data.path={base}", f"data.collect_episodes={a.demos}", *a.sets])
    a.cache.mkdir(parents=True, exist_ok=True)
    prepare_dataset(cfg, collect_if_missing=a.dataset is None, progress=True)
    image_keys = list(open_demos(base, cfg.data.obs_keys).episodes(None)[0].images)
    load = os.getloadavg()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} thread(s), load average at start {load[0]:.1f}; config {a.config.name}, batch "
          f"{cfg.train.batch_size}, encoder width {cfg.policy.encoder.width}, crop {cfg.policy.encoder.crop}")
    step_wall, step_cpu = step_ms(cfg, a.repeats)
    print(f"training step (incl. loading), {base.name}: {step_wall:.0f} ms wall, {step_cpu:.0f} ms CPU "
          f"({a.repeats} repeats, medians); data.image_cache={cfg.data.image_cache}")
    print("| demos | frames | as uint8 in memory | as float32 | loader per batch: wall, CPU (share of a step's CPU) "
          "| peak RSS of `train` | its wall |")
    print("|---|---|---|---|---|---|---|")
    for factor in [int(s) for s in a.scales.split(",")]:
        path = scaled_copy(base, factor, a.cache / f"{base.stem}_x{factor}.hdf5") if factor > 1 else base
        frames, nbytes = frame_count(path, image_keys)
        load_wall, load_cpu = loader_ms(cfg, path, a.repeats)
        rss, wall = peak_rss_of_training(a.config, path, a.rss_steps, a.threads, a.sets)
        with h5py.File(path) as f:
            n = len(f["data"])
        print(f"| {n} | {frames} | {nbytes / 2**20:.0f} MiB | {4 * nbytes / 2**20:.0f} MiB | {load_wall:.0f} ms, "
              f"{load_cpu:.0f} ms ({load_cpu / step_cpu:.0%}) | {rss:.0f} MiB | {wall:.0f} s |", flush=True)

if __name__ == "__main__":
    main()
