"""`dopr-robot eval`: many seeded closed-loop episodes of a checkpoint, in parallel `spawn` worker processes.

Episode i gets seed `seed_start + i` (every start distinct and recorded). Results are ordered by seed, so the
same seeds give the same per-episode success vector whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import torch

from dopr_robot.datasets.robomimic_hdf5 import write_robomimic
from dopr_robot.envs import RobosuiteEnv
from dopr_robot.evaluation.rollout import run_episode
from dopr_robot.evaluation.stats import wilson_interval
from dopr_robot.evaluation.video import VideoPlan, VideoWorker
from dopr_robot.envs.render import RenderSpec
from dopr_robot.progress import progress_bar
from dopr_robot.checkpoint import load_policy, resolve_checkpoint

_worker: dict[str, Any] = {}


def _init_worker(checkpoint: str, max_steps: int, n_action_steps: int | None, record: bool,
                 videos: VideoPlan | None = None) -> None:
    """Load the policy and build the environment once per worker process."""
    torch.set_num_threads(1)  # one core per worker; also keeps CPU float results independent of the pool size
    policy, meta = load_policy(checkpoint)
    _worker.update(policy=policy, env=RobosuiteEnv(meta["env_args"]), obs_keys=meta["obs_keys"],
                   max_steps=max_steps, record=record,
                   n_action_steps=n_action_steps or meta["config"]["data"]["n_action_steps"],
                   videos=VideoWorker(videos, meta["env_args"]) if videos else None)


def _run(seed: int, rerun_for_video: bool = False):
    w = _worker
    recorder = w["videos"].recorder(seed, rerun_for_video) if w["videos"] else None
    if recorder is None:
        return run_episode(w["policy"], w["env"], seed, w["max_steps"], w["n_action_steps"], w["obs_keys"],
                           w["record"])
    with recorder:  # rendering environment; a partial video is removed if the episode raises
        result, trajectory = run_episode(w["policy"], recorder.env, seed, w["max_steps"], w["n_action_steps"],
                                         w["obs_keys"], w["record"], recorder=recorder)
        recorder.finish(result["success"])
    return result, trajectory


def _rerun_for_video(seed: int):
    return _run(seed, rerun_for_video=True)


def evaluate(checkpoint: str | Path, episodes: int | None = None, seed_start: int | None = None,
             max_steps: int | None = None, workers: int | None = None, n_action_steps: int | None = None,
             save_trajectories: Path | None = None, progress: bool = True, videos: int = 0, videos_failed: int = 0,
             video_spec: RenderSpec = RenderSpec(), videos_dir: Path | None = None) -> dict[str, Any]:
    """Arguments left as None come from the `eval` section of the checkpoint's training config.

    `videos` / `videos_failed` record the first N episodes / up to N failed ones as MP4s in `videos_dir`
    (see evaluation/video.py); rendering is checked before any episode runs."""
    ckpt = resolve_checkpoint(checkpoint)
    _, meta = load_policy(ckpt)  # validates the checkpoint before any worker starts
    defaults = meta["config"]["eval"]
    episodes = defaults["episodes"] if episodes is None else episodes
    seed_start = defaults["seed_start"] if seed_start is None else seed_start
    max_steps = defaults["max_steps"] if max_steps is None else max_steps
    workers = defaults["workers"] if workers is None else workers
    seeds = [seed_start + i for i in range(episodes)]
    workers = max(1, min(workers or os.cpu_count() or 1, episodes))
    video_plan = VideoPlan.create(seeds, videos, videos_failed, video_spec,
                                  videos_dir or ckpt.parent.parent / "videos", meta["env_args"])
    if video_plan:
        video_plan.preflight(meta["env_args"], seed_start)
    init_args = (str(ckpt), max_steps, n_action_steps, save_trajectories is not None, video_plan)
    start = time.time()
    results, trajectories = {}, {}
    bar = progress_bar(total=episodes, desc="eval", unit="ep", enabled=progress)

    def consume(item) -> None:
        result, trajectory = item
        results[result["seed"]] = result
        if trajectory is not None:
            trajectories[result["seed"]] = trajectory
        bar.update(1)
        bar.set_postfix(success=f"{sum(r['success'] for r in results.values())}/{len(results)}", refresh=False)

    if workers == 1:
        _init_worker(*init_args)
        for seed in seeds:
            consume(_run(seed))
        reruns = [_rerun_for_video(seed) for seed in video_plan.reruns(results)] if video_plan else []
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
            for item in pool.imap_unordered(_run, seeds):
                consume(item)
            reruns = list(pool.imap_unordered(_rerun_for_video, video_plan.reruns(results))) if video_plan else []
    bar.close()
    wall = time.time() - start

    per_episode = [results[s] for s in seeds]
    successes = sum(r["success"] for r in per_episode)
    lo, hi = wilson_interval(successes, episodes)
    config = meta["config"]
    report = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "policy": config["policy"]["type"], "backbone": config["policy"]["backbone"],
        "optim": config["optim"]["name"],
        "ap": config["optim"]["ap"] if config["optim"]["name"].startswith("dopr") else None,
        "train_seed": config["train"]["seed"],
        "env_name": meta["env_args"].get("env_name"),
        "episodes": episodes, "seed_start": seed_start, "max_steps": max_steps, "workers": workers,
        "n_action_steps": n_action_steps or config["data"]["n_action_steps"],
        "successes": successes,
        "success_rate": successes / episodes,
        "success_ci95": [lo, hi],
        "mean_return": sum(r["return"] for r in per_episode) / episodes,
        "mean_steps": sum(r["steps"] for r in per_episode) / episodes,
        "wall_s": wall,
        "episodes_per_s": episodes / wall,
        "per_episode": per_episode,
    }
    if save_trajectories is not None:
        write_robomimic(save_trajectories, [trajectories[s] for s in seeds], meta["env_args"],
                        attrs={"source": "dopr-robot eval", "checkpoint": str(ckpt)}, compression="gzip")
        report["trajectories"] = str(save_trajectories)
    if video_plan:
        report["videos"] = video_plan.listing(results, reruns)
    return report


def format_report(report: dict[str, Any]) -> str:
    lo, hi = report["success_ci95"]
    ap = report["ap"]
    ap_text = f" (AP damping {ap['damping']} {ap['damping_form']})" if ap else ""
    rows = [
        ("checkpoint", f"{report['checkpoint']} (step {report['step']})"),
        ("policy", f"{report['policy']} / {report['backbone']}, optimizer {report['optim']}{ap_text}"),
        ("episodes", f"{report['episodes']} (seeds {report['seed_start']}..{report['seed_start'] + report['episodes'] - 1}, "
                     f"max {report['max_steps']} steps)"),
        ("success", f"{report['success_rate']:.1%}  [{lo:.1%}, {hi:.1%}] Wilson 95%  ({report['successes']}/{report['episodes']})"),
        ("mean steps", f"{report['mean_steps']:.1f}"),
        ("speed", f"{report['episodes_per_s']:.2f} episodes/s with {report['workers']} workers ({report['wall_s']:.0f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
