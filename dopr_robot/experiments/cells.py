"""One sweep cell, start to finish: `train` as a subprocess of the CLI, then every eval report in one more
subprocess that runs them all in one worker pool: the final checkpoint, `best` when training kept one, and once per
perturbation level.

Each step is skipped when its output is complete, so running a cell again only does what is missing:
- training is done when `checkpoints/final.json` exists; with `trainer_state.pt` and no final checkpoint it continues
  with `train --resume` (bit-exact; a failed resume, e.g. a corrupt state, starts the cell afresh);
- a report is done when it exists with the requested number of episodes and none of them errored; an interrupted
  or incomplete one continues from its per-episode journal (as `eval --resume`, which runs errored episodes again;
  a journal that cannot be resumed, e.g. of other settings, is run again).
The reports share one `EvalPool` (`evaluate_reports`, in `python -m dopr_robot.experiments.child PID --cell-reports
JOB`): its workers import torch/robosuite and build the environment once per cell rather than once per report.
The first report that fails stops the others and fails the cell with its one-line error.
A cell is *done* when all of its reports are. Subprocess output is appended to RUN/sweep.log, with a `$ ...` line
per subprocess and per report (the equivalent `dopr-robot eval` command). `run_cell` only takes a picklable
`CellJob`, so Ray or submitit can run it on another machine that shares the file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from dopr_robot.errors import UserError
from dopr_robot.rundir import read_metrics

if TYPE_CHECKING:
    from dopr_robot.evaluation.pool import EvalPool

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
    perturb: list[tuple[str, str, float]] = field(default_factory=list)  # (tag, Perturbation field, level)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CellJob":
        spec = json.loads(text)
        return cls(**{**spec, "perturb": [tuple(p) for p in spec["perturb"]]})


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
    errored = report.get("n_errors", report.get("errors", 0))  # `errors`: reports before n_errors
    return report.get("episodes") == episodes and isinstance(report.get("successes"), int) and \
        name == checkpoint_name and errored == 0


def planned_reports(job: CellJob) -> list[tuple[str, str, dict[str, Any]]]:
    """(report stem, checkpoint name, `run_eval` keyword arguments) of every report the cell needs, given what
    training kept; the reports of one checkpoint are next to each other (a pool worker keeps the last one loaded)."""
    run = Path(job.run_dir)
    common = {"run": str(run), "episodes": job.episodes}
    reports = [("eval", "final", {**common, "checkpoint_name": "final"})]
    for tag, name, level in job.perturb:
        reports.append((f"eval_{tag}", "final",
                        {**common, "checkpoint_name": "final", "tag": tag, "perturbation": {name: level}}))
    if (run / "checkpoints" / "best.json").is_file():
        reports.append(("eval_best", "best", {**common, "checkpoint_name": "best"}))
    return reports


def eval_command(kwargs: dict[str, Any]) -> list[str]:
    """The `dopr-robot eval` arguments equivalent to `run_eval(**kwargs)` of a planned report (for the log)."""
    args = ["eval", kwargs["run"], "--checkpoint", kwargs["checkpoint_name"]]
    if "tag" in kwargs:
        args += ["--tag", kwargs["tag"]]
    for name, level in kwargs.get("perturbation", {}).items():
        args += ["--" + name.replace("_", "-"), f"{level:g}"]
    return [*args, "--episodes", str(kwargs["episodes"])]


def _missing_reports(job: CellJob) -> list[tuple[str, str, dict[str, Any]]]:
    run = Path(job.run_dir)
    return [r for r in planned_reports(job) if not report_complete(run / f"{r[0]}.json", job.episodes, r[1])]


def is_done(job: CellJob) -> bool:
    return (Path(job.run_dir) / "checkpoints" / "final.json").is_file() and not _missing_reports(job)


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
        missing = [stem for stem, _, _ in _missing_reports(job)]
        if missing:
            rc, error = _run_logged(job, ["--cell-reports", job.to_json()],
                                    shown=f"evaluate {', '.join(missing)} in one worker pool")
            if rc != 0:  # the reports run in order and stop at the first failure: the first missing one failed
                failed = next((stem for stem, _, _ in _missing_reports(job)), missing[0])
                raise CellFailed(f"{failed}: {error}")
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


def evaluate_reports(job: CellJob) -> int:
    """Write every missing report of the cell, in order, all in one `EvalPool`; returns the exit code (0; 2 after
    one `error: ...` line; 130 when interrupted). Runs in the cell's eval subprocess (see `child`)."""
    from dopr_robot.evaluation.evaluate import DEFAULT_EPISODE_TIMEOUT_S, EpisodesErrored
    from dopr_robot.evaluation.journal import journal_path
    from dopr_robot.evaluation.pool import EvalPool

    run = Path(job.run_dir)
    missing = _missing_reports(job)
    if not missing:
        return 0
    first = run / "checkpoints" / f"{missing[0][1]}.json"  # loaded by the workers as they start
    preload = first if first.is_file() and first.with_suffix(".safetensors").is_file() else None
    try:
        with EvalPool(max(1, min(job.eval_workers, job.episodes)), DEFAULT_EPISODE_TIMEOUT_S, preload) as pool:
            for stem, _, kwargs in missing:
                if journal_path(run / f"{stem}.json").is_file():
                    try:
                        _write_report(kwargs, pool, resume=True)
                        continue
                    except EpisodesErrored:  # the resume ran: its episodes errored again (the cell fails)
                        raise
                    except UserError as e:  # e.g. the journal is for other settings: run it from the start
                        print(f"cannot resume ({e}); running {stem} from the start", flush=True)
                _write_report(kwargs, pool, resume=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


def _write_report(kwargs: dict[str, Any], pool: EvalPool, resume: bool) -> None:
    """`dopr-robot eval` in `pool`: its command line (as a log header), then the report as the CLI prints it."""
    from dopr_robot.evaluation.evaluate import check_complete, format_report, run_eval

    args = [*eval_command(kwargs), "--workers", str(pool.workers), *(["--resume"] if resume else [])]
    print(_log_header(f"dopr-robot {shlex.join(args)}"), end="", flush=True)
    report, path = run_eval(**kwargs, resume=resume, pool=pool)
    print(f"{format_report(report)}\nreport -> {path}", flush=True)
    check_complete(report, path)  # errored episodes fail the cell (the report stays, to be resumed)


def _log_header(command: str) -> str:
    """The sweep.log line that starts a command's output: `$ COMMAND    # UTC time`."""
    return f"\n$ {command}    # {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}\n"


def _run_logged(job: CellJob, args: list[str], carried: str = "", wait_for_run_dir: bool = False,
                shown: Optional[str] = None) -> tuple[int, str]:
    """Run `dopr-robot ARGS` (or the child's other mode, `--cell-reports`, with `shown` as its log header),
    appending its output to RUN/sweep.log; returns (exit code, its error line).

    A fresh `train` refuses a non-empty run directory, so with `wait_for_run_dir` the log is opened only once
    training has created the directory (output until then is kept in memory)."""
    run = Path(job.run_dir)
    log_path = run / LOG_NAME
    pending = [carried, _log_header(shown or f"dopr-robot {shlex.join(args)}")]
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
