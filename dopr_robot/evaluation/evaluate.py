"""`dopr-robot eval`: many seeded closed-loop episodes of a checkpoint, in parallel `spawn` worker processes.

Episode i gets seed `seed_start + i` (every start distinct and recorded); episodes run in blocks of
`batch_episodes` fixed by seed (see `lockstep`). Results are ordered by seed, so the same seeds and block size
give the same per-episode records whatever the number of workers, and whether or not the run was interrupted
and resumed.

The main process stays light: it reads the checkpoint's JSON (and checks that its weights file is there),
starts the worker pool at once, and lets the workers load the policy and build the environment (see `pool`).
It imports neither torch nor robosuite (unless `device` puts the policy here). Every finished episode is journaled (see `journal`), and the report
is written atomically at the end. An earlier report of the same name is renamed `<stem>-<YYYYmmdd-HHMMSS>.json`
(its modification time, UTC) with its journal and videos directory under the same suffix, when a fresh
evaluation starts (see `archive`).

Videos (`videos` / `videos_failed`, see `video`): rendering and MP4 encoding are checked in the main process
before the pool starts (this imports robosuite here, and only then; the MUJOCO_GL backend it settles on is
inherited by the workers). The first N seeds are recorded as they run; the failed seeds to show are run again,
with recording, after all episodes have ended (not journaled: they repeat episodes already recorded).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dopr_robot.envs import check_pushable
from dopr_robot.envs.render import RenderSpec
from dopr_robot.errors import UserError, check_counts
from dopr_robot.evaluation.archive import archive_report
from dopr_robot.evaluation.journal import Journal, check_resumable, journal_path, read_journal, report_of_journal
from dopr_robot.evaluation.lockstep import episode_blocks
from dopr_robot.evaluation.perturb import Perturbation
from dopr_robot.evaluation.pool import EpisodeSettings, EvalPool, Outcome
from dopr_robot.evaluation.video import VideoPlan, videos_dir_for
from dopr_robot.stats import wilson_interval
from dopr_robot.progress import progress_bar
from dopr_robot.provenance import file_sha256, provenance
from dopr_robot.rundir import ROLLOUTS_SOURCE, check_writable_dir, resolve_checkpoint, rollouts_path

DEFAULT_EPISODE_TIMEOUT_S = 600.0
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ------------------------------------------------------------------------------------- checkpoints, cheaply
def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's JSON, checked for what evaluation needs (no torch: workers build the policy)."""
    try:
        meta = json.loads(path.read_text())
        data = meta["config"]["data"]
        for key in ("horizon", "n_obs_steps", "n_action_steps"):
            if not isinstance(data[key], int):
                raise TypeError(f"config.data.{key} is not an integer")
        int(meta["obs_dim"]), int(meta["action_dim"])
        if not isinstance(meta["obs_keys"], list) or not isinstance(meta["config"].get("eval", {}), dict):
            raise TypeError("obs_keys is not a list")
        env_args = meta["env_args"]
        if not isinstance(env_args, dict) or "env_name" not in env_args or "env_kwargs" not in env_args:
            raise TypeError("env_args is not a robosuite env_args object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint metadata {path} is malformed ({type(e).__name__}: {e})") from None
    if not path.with_suffix(".safetensors").is_file():
        raise UserError(f"checkpoint weights not found: {path.with_suffix('.safetensors')}")
    return meta


# ---------------------------------------------------------------------------------------- report locations
def _run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def default_report_path(checkpoint: Path, tag: str | None = None) -> Path:
    """RUN/eval.json for `final`, RUN/eval_<name>.json for another checkpoint, RUN/eval_<tag>.json with a tag."""
    name = tag or (None if checkpoint.stem == "final" else checkpoint.stem)
    return _run_dir_of(checkpoint) / (f"eval_{name}.json" if name else "eval.json")


def check_report_path(out: Path) -> None:
    """Fail now, before any episode runs, if the report (and its journal) cannot be written there."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a .json file path")
    if out.suffix != ".json":
        raise UserError(f"--out {out}: the report is JSON; give a path ending in .json")
    check_writable_dir(out.parent, what="directory of --out")
    out.parent.mkdir(parents=True, exist_ok=True)  # the journal is appended there as episodes end


# -------------------------------------------------------------------------------------------- evaluation
def check_device(device: str | None) -> str | None:
    """`--device`: None (the policy runs in the workers), cpu, cuda or cuda:N, checked before any worker starts."""
    if device is None:
        return None
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise UserError(f"--device must be cpu, cuda or cuda:N; got {device!r}")
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: no such CUDA device here (torch sees "
                            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    return device


def evaluate(checkpoint: str | Path, episodes: int | None = None, seed_start: int | None = None,
             max_steps: int | None = None, workers: int | None = None, n_action_steps: int | None = None,
             save_trajectories: Path | None = None, progress: bool = True, *, checkpoint_name: str | None = None,
             perturbation: Perturbation | dict[str, float] | None = None, journal: Path | None = None,
             resume: bool = False, pool: EvalPool | None = None,
             episode_timeout_s: float = DEFAULT_EPISODE_TIMEOUT_S, tag: str | None = None,
             videos: int = 0, videos_failed: int = 0, video_spec: RenderSpec | None = None,
             videos_dir: Path | None = None, allow_errors: bool = False, batch_episodes: int | None = None,
             device: str | None = None) -> dict[str, Any]:
    """Evaluate one checkpoint; returns the report (a dict, not yet written).

    Arguments left as None come from the `eval` section of the checkpoint's training config. `journal`: append
    each finished episode there; with `resume`, episodes already in it (same checkpoint and settings) are not
    run again. `pool`: an `EvalPool` to use (and leave open); without one, a pool is started here.
    `videos` / `videos_failed`: record the first N episodes (by seed) / up to N failed ones as MP4s in
    `videos_dir` (default: beside the default report, `videos_dir_for`), listed in the report's `videos`;
    `wall_s` and `episodes_per_s` are those of the evaluation, without the re-runs for failed-episode videos.
    Episodes that errored are missing, not failures (see `summarize`); `allow_errors` is only recorded here
    (`check_complete` acts on it). `batch_episodes` B: episodes run in blocks of B fixed by seed (`lockstep`).
    `device`: run the policy in this process on that device, the workers only step environments (`pool`).
    """
    ckpt = resolve_checkpoint(checkpoint, checkpoint_name)
    meta = read_checkpoint_meta(ckpt)
    config = meta["config"]
    defaults = config.get("eval", {})
    episodes = defaults.get("episodes", 50) if episodes is None else episodes
    seed_start = defaults.get("seed_start", 100000) if seed_start is None else seed_start
    max_steps = defaults.get("max_steps", 400) if max_steps is None else max_steps
    workers = defaults.get("workers", 0) if workers is None else workers
    # a checkpoint from before batched episodes was reported one episode at a time: it keeps B = 1
    batch = defaults.get("batch_episodes", 1) if batch_episodes is None else batch_episodes
    check_counts(("--episodes", episodes, 1), ("--max-steps", max_steps, 1), ("--workers", workers, 0),
                 ("--seed-start", seed_start, 0), ("--batch-episodes", batch, 1))
    device = pool.device if pool is not None else check_device(device)
    d = config["data"]
    most = d["horizon"] - d["n_obs_steps"] + 1
    n_action_steps = d["n_action_steps"] if n_action_steps is None else n_action_steps
    if not 1 <= n_action_steps <= most:
        raise UserError(f"--n-action-steps must be in 1..{most} (horizon {d['horizon']} - n_obs_steps "
                        f"{d['n_obs_steps']} + 1) for this checkpoint; got {n_action_steps}")
    if not isinstance(perturbation, Perturbation):  # None or {level: value} overrides of the eval config
        levels = {k: defaults[k] for k in ("action_noise", "obs_noise", "push", "push_magnitude") if k in defaults}
        perturbation = Perturbation(**{**levels, **(perturbation or {})})
    if perturbation.push and perturbation.push_magnitude:
        check_pushable(meta["env_args"])  # one line now, not an error in every episode
    check_counts(("--videos", videos, 0), ("--videos-failed", videos_failed, 0))
    if resume and save_trajectories is not None:
        raise UserError("--resume cannot be combined with --save-trajectories (trajectories are not journaled); "
                        "rerun without --resume")
    settings = EpisodeSettings(max_steps=max_steps, n_action_steps=n_action_steps,
                               record=save_trajectories is not None, perturbation=perturbation)
    seeds = [seed_start + i for i in range(episodes)]
    blocks = episode_blocks(seeds, batch)
    video_plan = VideoPlan.create(seeds, videos, videos_failed, video_spec or RenderSpec(),
                                  videos_dir or videos_dir_for(default_report_path(ckpt, tag)), meta["env_args"])
    if video_plan is not None:
        settings = replace(settings, video=video_plan, video_seeds=video_plan.first_seeds)

    header = None
    done: dict[int, dict[str, Any]] = {}
    if journal is not None and resume:
        header, done = read_journal(journal)
        done = {s: r for s, r in done.items() if "error" not in r}  # errored episodes are missing: run again
    missing = [s for s in seeds if s not in done]
    # a block with a missing episode runs whole (its episodes' results depend on it); only the missing are kept
    to_run = [b for b in blocks if any(s not in done for s in b)]

    def journal_header() -> dict[str, Any]:
        return json.loads(json.dumps({
            "checkpoint": str(ckpt.resolve()), "weights_sha256": file_sha256(ckpt.with_suffix(".safetensors")),
            "step": meta.get("step"), "max_steps": max_steps, "n_action_steps": n_action_steps,
            "perturbation": perturbation.report(), "batch_episodes": batch, "device": device}))

    expected = None
    if header is not None:  # a resume is checked before anything starts
        expected = journal_header()
        check_resumable(journal, header, expected)
    if video_plan is not None:  # rendering and encoding work here, or one line naming the fix; before any worker
        video_plan.preflight(meta["env_args"], seed_start)
    workers = max(1, min(workers or os.cpu_count() or 1, max(1, len(to_run))))
    own_pool = pool is None and bool(missing)
    if own_pool:
        pool = EvalPool(workers, episode_timeout_s, preload=ckpt, device=device)  # workers start loading now
    try:
        if journal is not None and expected is None:  # a fresh evaluation (or a resume with no journal)
            expected = journal_header()  # hashing the weights overlaps the workers' start-up
            # the earlier report, its journal and its videos directory go aside together (`archive_report`)
            archive_report(report_of_journal(journal))
        start = time.time()
        outcomes: dict[int, Outcome] = {s: Outcome(r) for s, r in done.items() if s in seeds}
        bar = progress_bar(total=episodes, initial=len(outcomes), desc="eval", unit="ep", enabled=progress)
        log = Journal(journal, expected, done) if journal is not None else None

        def on_outcome(seed: int, outcome: Outcome) -> None:
            if seed in done:  # ran again with its block; the journal's record stands
                return
            outcomes[seed] = outcome
            if log is not None:
                log.append(outcome.record)
            bar.update(1)
            counts = summarize([o.record for o in outcomes.values()])
            bar.set_postfix(success=f"{counts['successes']}/{counts['n_completed']}", refresh=False,
                            **({"errors": counts["n_errors"]} if counts["n_errors"] else {}))

        try:
            if missing:
                pool.evaluate(ckpt, to_run, settings, on_outcome)
        finally:
            bar.close()
            if log is not None:
                log.close()
        wall = time.time() - start
        reruns: list[dict[str, Any]] = []
        rerun_seeds = video_plan.reruns({s: o.record for s, o in outcomes.items()}) if video_plan else []
        if rerun_seeds:  # failed episodes to show: the same episodes again (with their blocks), now recorded
            rerun_blocks = [b for b in blocks if set(b) & set(rerun_seeds)]
            if pool is None:  # every episode came from the journal
                pool, own_pool = EvalPool(max(1, min(workers, len(rerun_blocks))), episode_timeout_s,
                                          preload=ckpt, device=device), True
            rerun_settings = replace(settings, record=False, video_seeds=frozenset(rerun_seeds))
            rerun = pool.evaluate(ckpt, rerun_blocks, rerun_settings)
            reruns = [rerun[s].record for s in rerun_seeds]
    finally:
        if own_pool:
            pool.close()

    per_episode = [outcomes[s].record for s in seeds]
    optim = config["optim"]
    report = {
        "checkpoint": str(ckpt), "checkpoint_name": ckpt.stem, "step": meta.get("step"),
        "policy": config["policy"]["type"], "backbone": config["policy"]["backbone"],
        "optim": optim["name"], "ap": optim["ap"] if optim["name"].startswith("dopr") else None,
        "train_seed": config["train"]["seed"],
        "env_name": meta["env_args"].get("env_name"),
        **({"reference_scores": meta["reference_scores"]} if meta.get("reference_scores") else {}),  # Minari's
        "episodes": episodes, "seed_start": seed_start, "max_steps": max_steps,
        "workers": pool.workers if missing else 0, "n_action_steps": n_action_steps,
        "batch_episodes": batch, "device": device,
        **summarize(per_episode), "allow_errors": allow_errors,
        "resumed_episodes": len(seeds) - len(missing),
        "wall_s": wall, "episodes_per_s": len(missing) / wall if wall > 0 else 0.0,
        "perturbation": perturbation.report(), "tag": tag,
        "provenance": provenance(run_dir=_run_dir_of(ckpt)),
        "per_episode": per_episode,
    }
    if save_trajectories is not None:
        from dopr_robot.datasets.robomimic_hdf5 import write_robomimic

        trajectories = [outcomes[s].trajectory for s in seeds if outcomes[s].trajectory is not None]
        write_robomimic(save_trajectories, trajectories, meta["env_args"],
                        attrs={"source": ROLLOUTS_SOURCE, "checkpoint": str(ckpt)}, compression="gzip")
        report["trajectories"] = str(save_trajectories)
    if video_plan is not None:
        results = {s: o.record for s, o in outcomes.items()}
        report["videos"] = video_plan.listing(results, reruns)
        report["videos_missing"] = video_plan.missing(results, reruns)
    return report


def summarize(per_episode: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's counts and rates. An episode with an `error` (it raised, timed out, or killed its worker
    twice) is *missing*, not a policy failure: it is not counted in `successes`, and the rates, the Wilson interval
    and the means are over the completed episodes only; the report is `complete` when none is missing."""
    completed = [r for r in per_episode if "error" not in r]
    n = len(completed)
    successes = sum(bool(r["success"]) for r in completed)
    return {"n_completed": n, "n_errors": len(per_episode) - n, "complete": n == len(per_episode),
            "successes": successes, "success_rate": successes / n if n else None,
            "success_ci95": list(wilson_interval(successes, n)) if n else None,
            "mean_return": sum(r["return"] for r in completed) / n if n else None,
            "mean_steps": sum(r["steps"] for r in completed) / n if n else None}


class EpisodesErrored(UserError):
    """Some episodes of a written report errored (see `check_complete`)."""


def check_complete(report: dict[str, Any], path: Path) -> None:
    """After the report is written: episodes that errored end the command with one line (exit 2), unless the
    evaluation allowed them (`--allow-errors`, recorded in the report)."""
    if report["n_errors"] and not report["allow_errors"]:
        raise EpisodesErrored(f"{report['n_errors']} of {report['episodes']} episodes errored and are missing from the "
                        f"success rate (see per_episode[].error in {path}); `eval --resume` runs them again, "
                        f"--allow-errors accepts the incomplete report")


def run_eval(run: str | Path, checkpoint_name: str | None = None, out: Path | None = None,
             tag: str | None = None, resume: bool = False, save_trajectories: bool = False,
             **kwargs: Any) -> tuple[dict[str, Any], Path]:
    """The `eval` command: pick the report path, check it is writable, evaluate with a journal beside it,
    keep any earlier report (renamed, see `archive_report`), write the new one atomically. Returns (report, its
    path)."""
    from dopr_robot.fileio import write_json

    if tag is not None and not _TAG.match(tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '.', '_' or '-'")
    ckpt = resolve_checkpoint(run, checkpoint_name)
    out = Path(out) if out is not None else default_report_path(ckpt, tag)
    check_report_path(out)
    trajectories = rollouts_path(out) if save_trajectories else None
    kwargs.setdefault("videos_dir", videos_dir_for(out))  # RUN/eval_<tag>.json -> RUN/videos_<tag>
    report = evaluate(ckpt, save_trajectories=trajectories, journal=journal_path(out), resume=resume, tag=tag,
                      **kwargs)
    if out.exists():  # only after a resume: a fresh evaluation archived the earlier report when it started
        archive_report(out, with_journal_and_videos=False)
    write_json(out, report)
    return report, out


def _normalized(report: dict[str, Any]) -> str:
    """Minari's normalized return, (return - random) / (expert - random), where the dataset has reference scores."""
    scores = report.get("reference_scores")
    if not scores or scores["max"] == scores["min"]:
        return ""
    value = (report["mean_return"] - scores["min"]) / (scores["max"] - scores["min"])
    return f"  (normalized {value:.3f}: 0 = random {scores['min']:g}, 1 = expert {scores['max']:g})"


def format_report(report: dict[str, Any]) -> str:
    ap = report["ap"]
    ap_text = f" (AP damping {ap['damping']} {ap['damping_form']})" if ap else ""
    last = report["seed_start"] + report["episodes"] - 1
    rows = [
        ("checkpoint", f"{report['checkpoint']} (step {report['step']})"),
        ("policy", f"{report['policy']} / {report['backbone']}, optimizer {report['optim']}{ap_text}"),
        ("episodes", f"{report['episodes']} (seeds {report['seed_start']}..{last}, max {report['max_steps']} steps, "
                     f"{report['n_action_steps']} actions per chunk)"),
    ]
    if report["n_completed"]:
        lo, hi = report["success_ci95"]
        rows += [("success", f"{report['success_rate']:.1%}  [{lo:.1%}, {hi:.1%}] Wilson 95%  "
                             f"({report['successes']}/{report['n_completed']} completed)"),
                 ("mean steps", f"{report['mean_steps']:.1f}"),
                 ("mean return", f"{report['mean_return']:.2f}" + _normalized(report))]
    else:
        rows.append(("success", "none: no episode completed"))
    p = report.get("perturbation") or {}
    if any(p.values()):
        rows.append(("perturbation", f"action noise {p['action_noise']:g}, obs noise {p['obs_noise']:g}, "
                                     f"push p={p['push']:g} ({p['push_magnitude']:g} m/s)"))
    if report["n_errors"]:
        rows.append(("errors", f"{report['n_errors']} episodes errored: missing, not counted (INCOMPLETE report; "
                               f"see per_episode[].error)"))
    if "videos" in report:
        rows.append(("videos", f"{len(report['videos'])} recorded"))
    resumed = f", {report['resumed_episodes']} from the journal" if report.get("resumed_episodes") else ""
    where = f", policy on {report['device']} in the main process" if report.get("device") else ""
    rows.append(("speed", f"{report['episodes_per_s']:.2f} episodes/s with {report['workers']} workers, "
                          f"{report.get('batch_episodes', 1)} episodes per block{where} "
                          f"({report['wall_s']:.0f} s{resumed})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
