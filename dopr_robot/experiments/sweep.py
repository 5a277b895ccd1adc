"""`dopr-robot sweep`: every cell of optimizer x grid point x training seed trained and evaluated, resumably.

Everything is validated before any work (every cell's config loads, grid keys exist, DIR is new or this sweep's).
DIR/sweep.json records the sweep and each cell's settings and state; it is rewritten atomically at every change.
Running the same command again skips done cells, resumes interrupted ones and retries failed ones. Against an
existing DIR the config file (path and content), `--set`, the grid keys, `--episodes` and `--perturb` must be
the same; optimizers, seeds and grid values may differ: new cells are added, cells not asked for are left as they are.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from dopr_robot.config import load_config
from dopr_robot.errors import UserError, check_counts
from dopr_robot.experiments.cells import CellJob, is_done, summary
from dopr_robot.experiments.grid import (Cell, cell_config, check_overrides, distinct_cells, enumerate_cells,
                                         parse_grid, parse_optims, parse_perturb, parse_seeds, perturb_tag)
from dopr_robot.experiments.launchers import check_available, launch
from dopr_robot.fileio import write_json
from dopr_robot.provenance import file_sha256

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
IDENTITY = ("config", "config_sha256", "set", "grid_keys", "episodes", "perturb")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_sweep(config: Path, out: Path, optims: str, seeds: str, grid: list[str], sets: list[str], jobs: int = 1,
              episodes: Optional[int] = None, workers: Optional[int] = None, perturb: list[str] = (),
              launcher: str = "local", launcher_options: list[str] = (), dry_run: bool = False,
              command: Optional[list[str]] = None, echo: Callable[[str], None] = print) -> int:
    """Run (or with `dry_run` list) the sweep; returns the number of cells that failed."""
    # ---- validate everything before any work
    check_counts(("--jobs", jobs, 1), ("--episodes", episodes, 1), ("--workers", workers, 1))
    if not config.is_file():
        raise UserError(f"config file not found: {config}")
    optim_list, seed_list = parse_optims(optims), parse_seeds(seeds)
    grid_values, perturb_levels = parse_grid(list(grid)), parse_perturb(list(perturb))
    sets = list(sets)
    check_overrides(sets)
    check_available(launcher)
    options = _parse_options(launcher_options)
    load_config(config, sets)  # the file and --set on their own: their errors name no cell
    for key, values in grid_values.items():  # a key error names the key, not the first cell
        try:
            load_config(config, [*sets, f"{key}={values[0]}"])
        except UserError as e:
            raise UserError(f"--grid {key}: {e}") from None
    cells = enumerate_cells(optim_list, grid_values, seed_list)
    configs = {cell.name: cell_config(config, sets, cell) for cell in cells}
    cells, same = distinct_cells(cells, configs)  # cells that would train the same run run once
    out = out.absolute()
    previous = _existing_sweep(out)
    identity = {"config": str(config.resolve()), "config_sha256": file_sha256(config),
                "set": sets, "grid_keys": list(grid_values), "episodes": episodes, "perturb": perturb_levels}
    if previous is not None:
        for key in IDENTITY:
            if previous.get(key) != identity[key]:
                raise UserError(f"{out} holds a sweep with another {key.replace('_', ' ')} ({previous.get(key)!r}, "
                                f"now {identity[key]!r}); use a new --out, or the sweep's own settings")

    cores = available_cores()
    threads = max(1, cores // jobs)
    user_keys = {item.partition("=")[0].strip() for item in sets} | set(grid_values)
    job_list = [_job(cell, config, sets, out, threads, workers or threads, episodes or configs[cell.name].eval.episodes,
                     perturb_levels, "train.threads" not in user_keys) for cell in cells]
    done = {job.name: is_done(job) for job in job_list}
    threads_text = "train.threads as --set" if "train.threads" in user_keys else f"{threads} threads"
    to_run = [job for job in job_list if not done[job.name]]

    if same:
        echo(f"{len(same)} cell(s) left out, each the same run as a kept one (settings its optimizer never reads): "
             + ", ".join(f"{dropped} = {kept}" for dropped, kept in same.items()))
    if dry_run:
        echo(f"sweep {out}: {len(cells)} cells ({len(cells) - len(to_run)} done, {len(to_run)} to run); "
             f"{jobs} at a time, {threads_text} each")
        for cell, job in zip(cells, job_list):
            echo(f"  {'done' if done[cell.name] else 'todo'}  {cell.name}  "
                 f"{' '.join(f'{k}={v}' for k, v in cell.settings.items())}")
        return 0

    # ---- run
    import filelock

    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UserError(f"another sweep is running in {out} (it holds {out / LOCK_FILE})") from None
    try:
        record = _merge_record(previous, identity, command or sys.argv, launcher, optim_list, seed_list,
                               grid_values, cells, job_list, done)
        state = _SweepState(out / SWEEP_FILE, record)
        state.save()
        echo(f"sweep {out}: {len(cells)} cells ({len(cells) - len(to_run)} done, {len(to_run)} to run); "
             f"{jobs} at a time, {threads_text} each")
        _prepare_datasets([configs[job.name] for job in to_run])
        progress = _Progress(len(to_run), min(jobs, len(to_run)) or 1, echo)
        # A cell's wall_s is its wall time summed over every invocation that worked on it (an interrupted one up
        # to its last state change), so a resumed cell reports what it cost in all, not its last stretch.
        spent = {job.name: state.cell(job.name).get("wall_s") or 0.0 for job in to_run}
        started: dict[str, float] = {}

        def on_state(name: str, cell_state: str) -> None:
            started.setdefault(name, time.time())
            state.update(name, state=cell_state, wall_s=spent[name] + time.time() - started[name])

        def on_done(job: CellJob, result: dict[str, Any]) -> None:
            if result.get("wall_s") is not None:
                result = {**result, "wall_s": spent[job.name] + result["wall_s"]}
            state.update(job.name, **result)
            progress.finished(job.name, result)

        launch(launcher, to_run, jobs, options, out, on_state, on_done)
    finally:
        lock.release()
    failed = [job.name for job in to_run if state.cell(job.name)["state"] == "failed"]
    echo(f"sweep {out}: {len(cells) - len(failed)}/{len(cells)} cells done"
         + (f"; failed: {', '.join(failed)} (see <cell>/sweep.log; run the same command again to retry)"
            if failed else "") + f" -> {out / SWEEP_FILE}")
    return len(failed)


def _job(cell: Cell, config: Path, sets: list[str], out: Path, threads: int, eval_workers: int, episodes: int,
         perturb: dict[str, list[float]], set_threads: bool) -> CellJob:
    run_dir = out / cell.name
    train_args = ["train", "--config", str(config.absolute()), "--optim", cell.optim, "--seed", str(cell.seed),
                  "--out", str(run_dir)]
    for item in [*sets, *cell.overrides(), *([f"train.threads={threads}"] if set_threads else [])]:
        train_args += ["--set", item]
    return CellJob(name=cell.name, run_dir=str(run_dir), python=sys.executable, cwd=os.getcwd(),
                   train_args=train_args, episodes=episodes, eval_workers=eval_workers, threads=threads,
                   perturb=[(perturb_tag(name, level), name, level)
                            for name, levels in perturb.items() for level in levels])


def _parse_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--launcher-opt expects key=value; got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def _existing_sweep(out: Path) -> Optional[dict[str, Any]]:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    path = out / SWEEP_FILE
    if not path.is_file():
        if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
            raise UserError(f"--out {out} exists and is not a sweep directory (no {SWEEP_FILE}); choose a new one")
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("cells"), list):
            raise ValueError("no cells list")
    except ValueError as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0]}); move it away to start a new sweep") from None
    return record


def _merge_record(previous, identity, command, launcher, optims, seeds, grid, cells, jobs, done) -> dict[str, Any]:
    old_cells = {c["name"]: c for c in previous["cells"]} if previous else {}
    old_grid = previous.get("grid", {}) if previous else {}
    merged_grid = {k: list(dict.fromkeys([*old_grid.get(k, []), *grid[k]])) for k in grid}
    record = {**identity, "command": list(command), "launcher": launcher,
              "optims": list(dict.fromkeys([*(previous or {}).get("optims", []), *optims])),
              "seeds": sorted(set((previous or {}).get("seeds", [])) | set(seeds)), "grid": merged_grid,
              "created": (previous or {}).get("created") or _now(), "updated": _now()}
    new_cells = []
    for cell, job in zip(cells, jobs):
        old = old_cells.pop(cell.name, {})
        entry = {"name": cell.name, "dir": job.run_dir, "optim": cell.optim, "seed": cell.seed,
                 "settings": dict(cell.settings), "state": "done" if done[cell.name] else "pending",
                 "success_rate": None, "best_success_rate": None, "val_loss": None, "wall_s": None, "error": None,
                 "train_command": ["dopr-robot", *job.train_args]}
        for key in ("success_rate", "best_success_rate", "val_loss", "wall_s", "error"):
            entry[key] = old.get(key, entry[key])
        if entry["state"] == "pending" and old.get("state") == "failed":
            entry["state"] = "failed"  # until it is retried below
        if done[cell.name] and entry["success_rate"] is None:
            entry.update(summary(Path(job.run_dir)))
        new_cells.append(entry)
    record["cells"] = [*old_cells.values(), *new_cells]  # cells of earlier invocations not asked for stay listed
    return record


class _SweepState:
    """sweep.json in memory; every change is written atomically (worker threads call `update`)."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record, self.lock = path, record, threading.Lock()
        self.index = {c["name"]: c for c in record["cells"]}

    def cell(self, name: str) -> dict[str, Any]:
        return self.index[name]

    def update(self, name: str, **values: Any) -> None:
        with self.lock:
            self.index[name].update(values)
            self.record["updated"] = _now()
            self.save()

    def save(self) -> None:
        write_json(self.path, self.record)


class _Progress:
    """One line per finished cell: its results, its wall time and an ETA for the cells still to run."""

    def __init__(self, total: int, parallel: int, echo: Callable[[str], None]):
        self.total, self.parallel, self.echo = total, parallel, echo
        self.finished_count, self.walls, self.lock = 0, [], threading.Lock()

    def finished(self, name: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.finished_count += 1
            if result.get("wall_s") is not None:
                self.walls.append(result["wall_s"])
            left = self.total - self.finished_count
            # `parallel` cells run at once: remaining time ~ mean cell wall time x cells left / parallel
            mean = sum(self.walls) / len(self.walls) if self.walls else 0.0
            eta = (f"ETA {_duration(mean * left / self.parallel)} for {left} cell{'s' if left > 1 else ''}"
                   if left else "last cell")
            wall = _duration(result["wall_s"]) if result.get("wall_s") is not None else "?"
            if result["state"] == "done":
                text = f"success {_pct(result['success_rate'])}"
                if result.get("best_success_rate") is not None:
                    text += f" (best ckpt {_pct(result['best_success_rate'])})"
                val = result.get("val_loss")
                text += f", val_loss {val:.4g}" if val is not None else ", val_loss -"
            else:
                text = f"FAILED: {result['error']}"
            self.echo(f"[{self.finished_count}/{self.total}] {name}: {text}, {wall}; {eta}")


def _prepare_datasets(configs: list) -> None:
    """Collect a missing dataset once here, not in parallel in every cell's `train`."""
    missing = {c.data.path: c for c in configs if not Path(c.data.path).exists()}
    if missing:
        from dopr_robot.collect import prepare_dataset

        for cfg in missing.values():
            prepare_dataset(cfg, collect_if_missing=True, progress=True)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
