"""One sweep cell, start to finish, as subprocesses of the CLI: `train`, then `eval` of the final checkpoint, of
`best` when training kept one, and once per perturbation level.

Each step is skipped when its output is complete, so running a cell again only does what is missing:
- training is done when `checkpoints/final.json` exists; with `trainer_state.pt` and no final checkpoint it continues
  with `train --resume` (bit-exact; a failed resume, e.g. a corrupt state, starts the cell afresh);
- a report is done when it exists with the requested number of episodes; an interrupted one continues from its
  per-episode journal with `eval --resume` where this CLI has that flag (else it is run again).
A cell is *done* when all of its reports are. Subprocess output is appended to RUN/sweep.log. `run_cell` only
takes a picklable `CellJob`, so Ray or submitit can run it on another machine that shares the file system.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from dopr_robot.rundir import read_metrics

LOG_NAME = "sweep.log"


@dataclass
class CellJob:
    name: str
    run_dir: str                 # absolute
    python: str                  # interpreter that runs `-m dopr_robot.cli`
    cwd: str                     # working directory of the subprocesses (relative data paths resolve here)
    train_args: list[str]        # `train ...` arguments, without --resume / --overwrite
    episodes: int                # episodes of every report
    eval_workers: int
    threads: int                 # CPU threads for this cell (OMP_NUM_THREADS of its subprocesses)
    perturb: list[tuple[str, str, float]] = field(default_factory=list)  # (tag, eval flag, level)


class CellFailed(Exception):
    pass


_running: set[subprocess.Popen] = set()  # this process's live cell subprocesses (see `terminate_running`)
_running_lock = threading.Lock()


def terminate_running() -> None:
    """SIGTERM every live cell subprocess (the sweep was interrupted): a cell loses its work since its last trainer
    state and is resumed by the next run, exactly as after kill -9."""
    with _running_lock:
        for proc in _running:
            proc.terminate()


def report_complete(path: Path, episodes: int, checkpoint_name: str) -> bool:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    name = report.get("checkpoint_name") or Path(str(report.get("checkpoint", ""))).stem
    return report.get("episodes") == episodes and isinstance(report.get("successes"), int) and name == checkpoint_name


def planned_reports(job: CellJob) -> list[tuple[str, str, list[str]]]:
    """(report stem, checkpoint name, eval arguments) of every report the cell needs, given what training kept."""
    run = Path(job.run_dir)
    common = ["--episodes", str(job.episodes), "--workers", str(job.eval_workers)]
    reports = [("eval", "final", ["eval", str(run), *common])]
    if (run / "checkpoints" / "best.json").is_file():
        reports.append(("eval_best", "best", ["eval", str(run), "--checkpoint", "best", *common]))
    for tag, flag, level in job.perturb:
        reports.append((f"eval_{tag}", "final", ["eval", str(run), "--tag", tag, flag, f"{level:g}", *common]))
    return reports


def is_done(job: CellJob) -> bool:
    run = Path(job.run_dir)
    return (run / "checkpoints" / "final.json").is_file() and all(
        report_complete(run / f"{stem}.json", job.episodes, ckpt) for stem, ckpt, _ in planned_reports(job))


def summary(run_dir: Path) -> dict[str, Any]:
    """success_rate (final), best_success_rate, val_loss (last logged) of a run, None where missing."""
    def success(name: str) -> Optional[float]:
        try:
            return json.loads((run_dir / name).read_text()).get("success_rate")
        except (OSError, ValueError):
            return None

    val_losses = [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]
    val_loss = val_losses[-1] if val_losses else None
    return {"success_rate": success("eval.json"), "best_success_rate": success("eval_best.json"), "val_loss": val_loss}


def run_cell(job: CellJob, on_state: Optional[Callable[[str, str], None]] = None) -> dict[str, Any]:
    """Bring one cell to done. Returns {"state": "done"|"failed", "error", "wall_s", **summary}; never raises for a
    failing subprocess (fault isolation: one bad cell does not stop the sweep)."""
    start = time.time()
    run = Path(job.run_dir)
    notify = on_state or (lambda name, state: None)
    try:
        if not (run / "checkpoints" / "final.json").is_file():
            notify(job.name, "training")
            _train(job)
        notify(job.name, "evaluating")
        for stem, checkpoint_name, args in planned_reports(job):
            if report_complete(run / f"{stem}.json", job.episodes, checkpoint_name):
                continue
            journal = run / f"{stem}_episodes.jsonl"
            if journal.is_file():
                rc, _ = _run_logged(job, [*args, "--resume"])
                if rc == 0:
                    continue  # otherwise (e.g. the journal is for other settings) run it from the start
            rc, error = _run_logged(job, args)
            if rc != 0:
                raise CellFailed(f"{stem}: {error}")
        result = {"state": "done", "error": None}
    except CellFailed as e:
        result = {"state": "failed", "error": str(e)}
    return {**result, **summary(run), "wall_s": time.time() - start}


def _train(job: CellJob) -> None:
    run = Path(job.run_dir)
    if (run / "trainer_state.pt").is_file():
        rc, error = _run_logged(job, [*job.train_args, "--resume"])
        if rc == 0:
            return
        if "resume" not in error:
            raise CellFailed(f"train: {error}")
        # the saved state cannot be resumed (corrupt, or from another config): start the cell afresh
    carried = ""
    if run.exists():
        # Nothing in a cell without a trainer state or final checkpoint can be continued; keep only its log.
        log = run / LOG_NAME
        carried = log.read_text(errors="replace") if log.is_file() else ""
        shutil.rmtree(run)
    rc, error = _run_logged(job, job.train_args, carried=carried, wait_for_run_dir=True)
    if rc != 0:
        raise CellFailed(f"train: {error}")


def _run_logged(job: CellJob, args: list[str], carried: str = "", wait_for_run_dir: bool = False) -> tuple[int, str]:
    """Run `dopr-robot ARGS`, appending its output to RUN/sweep.log; returns (exit code, its error line).

    A fresh `train` refuses a non-empty run directory, so with `wait_for_run_dir` the log is opened only once
    training has created the directory (output until then is kept in memory)."""
    run = Path(job.run_dir)
    log_path = run / LOG_NAME
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    pending = [carried, f"\n$ dopr-robot {shlex.join(args)}    # {stamp}\n"]
    tail: deque[str] = deque(maxlen=50)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(job.threads)}
    command = [job.python, "-m", "dopr_robot.experiments.child", str(os.getpid()), *args]
    log = None
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              cwd=job.cwd, env=env) as proc:
            with _running_lock:
                _running.add(proc)
            for line in proc.stdout:
                tail.append(line)
                pending.append(line)
                if log is None and (not wait_for_run_dir or run.is_dir()):
                    run.mkdir(parents=True, exist_ok=True)
                    log = open(log_path, "a")
                if log is not None:
                    log.write("".join(pending))
                    log.flush()
                    pending.clear()
            rc = proc.wait()
            with _running_lock:
                _running.discard(proc)
        if log is None:
            run.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "a")
        log.write("".join(pending) + f"# exit code {rc}\n")
    finally:
        if log is not None:
            log.close()
    return rc, _error_line(rc, tail)


def _error_line(rc: int, tail: deque[str]) -> str:
    if rc == 0:
        return ""
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    lines = [line.strip() for line in tail if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1][len("error:"):].strip()
    return f"exit code {rc}: {lines[-1] if lines else 'no output'}"
