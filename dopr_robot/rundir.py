"""Run directories and output paths that are never destroyed or shared by mistake.

- `check_output_file(path)` / `check_run_dir(...)`: everything about an output path that can be checked before
  the work is done (not a directory where a file goes, parent creatable and writable, existing run replaced
  only when asked and only if it is a run of this tool, never the dataset's own directory or an ancestor of it).
- `run_lock(run_dir)`: an exclusive lock on RUN/run.lock holding the owner's PID; a second process on the same
  run fails with one line. The kernel drops an flock when its process dies (kill -9 included), so a stale lock
  file never blocks anyone.
- `clear_run_dir(run_dir)`: empties a run directory under its lock (the lock file itself stays).
- `resolve_checkpoint(RUN, name)`: RUN/checkpoints/<name>.json (default `final`, else the newest); no torch.
- `read_metrics(RUN/metrics.jsonl)`: its records, one per step, for everything that reads a run's metrics.
- `saved_state_step(RUN)`: the step a `train --resume` would continue from; `saved_state_note(RUN)` says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from dopr_robot.errors import UserError

LOCK_NAME = "run.lock"
RUN_MARKER = "config.yaml"  # every run directory this tool writes has its resolved config here
DRIFT_REPORT = "drift.json"  # `diagnose` writes it, `compare` reads it
SPECTRUM_REPORT = "spectrum.json"  # `spectrum` writes it
ROLLOUTS_SOURCE = "dopr-robot eval"  # the `source` attribute of rollouts `eval --save-trajectories` writes
ROLLOUTS_SUFFIX = "_rollouts.hdf5"  # `eval --save-trajectories` writes <report stem>_rollouts.hdf5, `diagnose` reads it


def rollouts_path(report: Path) -> Path:
    """Where `--save-trajectories` stores a report's episodes (robomimic layout): <report stem>_rollouts.hdf5."""
    return report.with_name(report.stem + ROLLOUTS_SUFFIX)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | Path, what: str = "output") -> None:
    """`path` is (or can be created as) a directory this process can write into. Creates nothing that stays:
    the nearest existing ancestor is probed with a temporary file (works for root too, unlike os.access)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"invalid {what} {path}: {base} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dopr-write-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e})") from None


def check_output_file(path: str | Path, overwrite: bool, suffixes: Iterable[str] | None = None,
                      what: str = "output") -> None:
    """An output file (or a zarr directory store) may be written at `path`: right suffix, not clobbering
    anything without `overwrite`, not a directory (except a store being replaced), parent writable."""
    path = Path(path)
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if path.suffix.lower() not in suffixes:
            raise UserError(f"invalid {what} {path}: the file name must end in {' or '.join(suffixes)}")
    if path.exists():
        if not overwrite:
            raise UserError(f"{path} exists; pass --overwrite to replace it")
        if path.is_dir() and path.suffix.lower() != ".zarr":
            raise UserError(f"{what} {path} is a directory; refusing to replace it with a file")
    check_writable_dir(path.parent, what=f"directory of {what}")


def _is_same_or_inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def check_run_dir(run_dir: str | Path, resume: bool, overwrite: bool, protected: Iterable[str | Path] = ()) -> None:
    """Validate the run directory before anything is written or deleted.

    resume: it must be a run (config.yaml, trainer_state.pt are checked by the trainer). New run: it must be
    absent or empty, or `overwrite` and a run of this tool (config.yaml inside) that contains none of the
    `protected` paths (the dataset, the config file)."""
    run_dir = Path(run_dir)
    check_writable_dir(run_dir, what="run directory")
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"--resume: run directory {run_dir} not found")
        return
    if not run_dir.exists() or not any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        return
    if not overwrite:
        raise UserError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
    if not (run_dir / RUN_MARKER).is_file():
        raise UserError(f"--overwrite: {run_dir} is not a dopr-robot run directory (no {RUN_MARKER}); "
                        f"refusing to delete it")
    for path in protected:
        if path is not None and Path(path).exists() and _is_same_or_inside(Path(path), run_dir):
            raise UserError(f"--overwrite: {run_dir} contains {path}, which this run needs; refusing to delete it")


def clear_run_dir(run_dir: str | Path) -> None:
    """Delete everything in `run_dir` except its lock file. Call only while holding `run_lock(run_dir)`."""
    for child in Path(run_dir).iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on RUN/run.lock (created with RUN) for the duration; the file records the owning PID.

    Raises UserError (one line, naming the owner's PID) when another process holds it. The file is removed on
    release; a process that opened the old file before the removal notices the changed inode and retries."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {path} ({e.strerror})") from None
            try:
                owner = path.read_text().strip() or "?"
            except OSError:
                owner = "?"
            raise UserError(f"run directory {run_dir} is in use by process {owner} ({path}); "
                            f"wait for it to finish or stop it") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous owner removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def saved_state_step(run_dir: str | Path) -> int | None:
    """The step of RUN/trainer_state.pt (what `train --resume` continues from), without loading it: train writes
    a step_NNNNNNN or final checkpoint and then the state, so it is the newest such checkpoint written before the
    state (a later one lost its state to a crash or a full disk). None when the run has no trainer state."""
    state = Path(run_dir) / "trainer_state.pt"
    try:
        written = state.stat().st_mtime_ns
    except OSError:
        return None
    steps = []
    for path in (Path(run_dir) / "checkpoints").glob("*.json"):
        if path.stem == "final" or (path.stem.startswith("step_") and path.stem[5:].isdigit()):
            try:
                if path.stat().st_mtime_ns <= written:
                    steps.append(int(json.loads(path.read_text())["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return max(steps) if steps else None


def saved_state_note(run_dir: str | Path) -> str:
    """What a stopped `train` leaves, in words: the trainer state a --resume continues from, or none."""
    step = saved_state_step(run_dir)
    if step is None and not (Path(run_dir) / RUN_MARKER).is_file():
        return f"training had not started writing {run_dir}: run the command again"
    if step is None:
        return (f"no trainer state of {run_dir} was saved yet (one is every train.checkpoint_every steps): start "
                f"it again with --overwrite")
    return (f"{run_dir} keeps its trainer state of step {step} (the steps after it are lost): "
            f"`dopr-robot train --out {run_dir} --resume` continues from there")


def read_metrics(path: Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl records sorted by step, one per step (the last wins); unparsable lines are skipped and
    reported (a crash can cut the last line short)."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    if bad and warnings is not None:
        warnings.append(f"{path}: {bad} unreadable line(s) skipped")
    return [by_step[s] for s in sorted(by_step)]


def resolve_checkpoint(run: str | Path, name: str | None = None) -> Path:
    """RUN (a run directory) + `name` (final|best|last|step_NNNNNNN|...) -> RUN/checkpoints/<name>.json.

    Without a name: `final`, else the newest checkpoint. A checkpoint file (.json/.safetensors) names itself.
    """
    run = Path(run)
    if run.is_dir():
        ckpt_dir = run / "checkpoints"
        if name is not None:
            path = ckpt_dir / f"{name}.json"
            if not path.is_file():
                have = sorted(p.stem for p in ckpt_dir.glob("*.json")) if ckpt_dir.is_dir() else []
                raise UserError(f"{run} has no checkpoint {name!r} (it has: {', '.join(have) or 'none'})")
            return path
        if (ckpt_dir / "final.json").is_file():
            return ckpt_dir / "final.json"
        candidates = sorted(ckpt_dir.glob("*.json"), key=lambda p: p.stat().st_mtime) if ckpt_dir.is_dir() else []
        if not candidates:
            raise UserError(f"{run} holds no checkpoints (expected {ckpt_dir}/final.json)")
        return candidates[-1]
    if name is not None:
        raise UserError("--checkpoint names a checkpoint of a run directory; give the run directory")
    if run.suffix == ".safetensors":
        run = run.with_suffix(".json")
    if not run.is_file():
        raise UserError(f"checkpoint not found: {run}")
    return run
