"""Finding runs and reading what compare uses from them: run directories, sweep directories (sweep.json) and the
checks on their eval reports (a run whose reports cannot be used is incomplete: listed, never an error)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from dopr_robot.errors import UserError
from dopr_robot.rundir import DRIFT_REPORT, read_metrics

PERTURBATION_KINDS = ("action_noise", "obs_noise", "push")
ARCHIVED_REPORT = re.compile(r"-\d{8}-\d{6}(-\d+)?$")  # eval*.json renamed aside by a later eval (kept, not current)


@dataclass
class Run:
    """One run directory and what was read from it; `problems` non-empty means incomplete (left out)."""
    dir: Path
    name: str
    optim: str | None = None
    seed: int | None = None
    settings: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    eval_best: dict[str, Any] | None = None
    perturbed: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    group: str = ""  # set by make_groups; a sweep cell's group is its name without the `_s<seed>` suffix
    sweep_group: str | None = None

    @property
    def complete(self) -> bool:
        return not self.problems

    def val_losses(self) -> list[float]:
        return [r["val_loss"] for r in self.metrics if finite(r.get("val_loss"))]

    def in_training_success(self) -> list[tuple[int, float]]:
        return [(r["step"], r["success"]) for r in self.metrics if finite(r.get("success"))]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def report_successes(report: dict) -> int:
    """Successful episodes of an eval report (its count, else its rate times its episodes)."""
    if isinstance(report.get("successes"), int):
        return int(report["successes"])
    return round(report["success_rate"] * report["episodes"])


def report_outcomes(report: dict) -> list[float]:
    """Per-episode successes (1.0 / 0.0) of an eval report (eval.json or eval_<tag>.json), in episode-seed order;
    a report without `per_episode` (older) gives its count of successes first."""
    per_episode = report.get("per_episode")
    if per_episode:
        return [float(bool(e["success"])) for e in per_episode]
    k = report_successes(report)
    return [1.0] * k + [0.0] * (int(report["episodes"]) - k)


def report_episode_seeds(report: dict) -> list[int] | None:
    per_episode = report.get("per_episode")
    return [int(e["seed"]) for e in per_episode] if per_episode else None


# ---------------------------------------------------------------- reading run directories

def read_json(path: Path, warnings: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        warnings.append(f"{path}: unreadable ({type(e).__name__}); ignored")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: not a JSON object; ignored")
        return None
    return data


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("config.yaml", "eval.json", "metrics.jsonl"))


def perturbation_of(report: dict) -> dict[str, float]:
    p = report.get("perturbation") or {}
    return {k: float(v) for k, v in p.items() if finite(v)}


def is_perturbed(report: dict) -> bool:
    p = perturbation_of(report)
    return any(p.get(k, 0.0) != 0.0 for k in PERTURBATION_KINDS)


def _report_problem(report: dict) -> str | None:
    """Why an eval report cannot be used (None if it can): a success rate, episodes and, when it lists them, one
    {seed, success} record per episode."""
    if not finite(report.get("success_rate")) or not isinstance(report.get("episodes"), int) \
            or report["episodes"] < 1:
        return "lacks success_rate/episodes"
    if not _valid_per_episode(report):
        return "per_episode is not one {seed, success} record per episode"
    return None


def _valid_per_episode(report: dict) -> bool:
    per_episode = report.get("per_episode")
    if per_episode is None:
        return True  # older reports: counts only (no paired test for them)
    return isinstance(per_episode, list) and len(per_episode) == report["episodes"] and all(
        isinstance(e, dict) and isinstance(e.get("seed"), int) and "success" in e for e in per_episode)


def load_run(path: Path, warnings: list[str], name: str | None = None) -> Run:
    """Read everything compare uses from one run directory (missing pieces become `problems`, not errors)."""
    run = Run(dir=path, name=name or path.name)
    if not path.is_dir():
        run.problems.append("directory missing")
        return run
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            run.config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError:
            warnings.append(f"{config_path}: not valid YAML; ignored")
        if run.config is not None and not isinstance(run.config, dict):
            run.config = None
    run.eval = read_json(path / "eval.json", warnings)
    run.eval_best = read_json(path / "eval_best.json", warnings)
    for report_path in sorted(path.glob("eval_*.json")):
        stem = report_path.stem
        if stem == "eval_best" or ARCHIVED_REPORT.search(stem):
            continue
        report = read_json(report_path, warnings)
        if report is None or not is_perturbed(report):
            continue
        problem = _report_problem(report)
        if problem:
            warnings.append(f"{report_path}: {problem}; ignored")
        else:
            run.perturbed.append(report)
    run.metrics = read_metrics(path / "metrics.jsonl", warnings)
    run.drift = read_json(path / DRIFT_REPORT, warnings)
    if run.config is not None:
        run.optim = (run.config.get("optim") or {}).get("name")
        run.seed = (run.config.get("train") or {}).get("seed")
    if run.eval is not None:
        run.optim = run.optim or run.eval.get("optim")
        run.seed = run.seed if run.seed is not None else run.eval.get("train_seed")
        problem = _report_problem(run.eval)
        if problem:
            run.problems.append(f"eval.json {problem}")
            run.eval = None
    else:
        run.problems.append("no eval.json (not evaluated yet)")
    if run.eval is not None:
        if is_perturbed(run.eval):
            warnings.append(f"{path / 'eval.json'}: a perturbed report ({perturbation_of(run.eval)}); its success is "
                            f"not the unperturbed held-out success")
        failed = sum("error" in e for e in run.eval.get("per_episode") or [])
        if failed:
            warnings.append(f"{path / 'eval.json'}: {failed} episode(s) failed to run (counted as failures)")
        if run.eval_best is None and (path / "checkpoints" / "best.json").is_file():
            warnings.append(f"{path}: has a best checkpoint but no eval_best.json "
                            f"(dopr-robot eval {path} --checkpoint best)")
    if run.optim is None:
        run.problems.append("optimizer unknown (no config.yaml)")
    return run


def discover(paths: Sequence[Path], warnings: list[str]) -> tuple[list[Run], list[dict]]:
    """Runs under `paths` (run dirs, sweep dirs with sweep.json, or dirs of run dirs) and the sweep.json files."""
    if not paths:
        raise UserError("compare needs at least one run or sweep directory")
    runs: dict[Path, Run] = {}
    sweeps: list[dict] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UserError(f"{path}: no such directory")
        if not path.is_dir():
            raise UserError(f"{path}: not a directory (give run or sweep directories)")
        sweep_file = path / "sweep.json"
        if sweep_file.is_file():
            sweep = read_json(sweep_file, warnings)
            if sweep is None or not isinstance(sweep.get("cells"), list):
                raise UserError(f"{sweep_file}: not a sweep.json (no list of cells)")
            sweeps.append({"path": str(sweep_file), "config": sweep.get("config"), "command": sweep.get("command")})
            for cell in sweep["cells"]:
                if not isinstance(cell, dict) or "name" not in cell:
                    raise UserError(f"{sweep_file}: a cell without a name")
                cell_dir = path / cell["name"]  # the sweep dir may have moved since; its cells sit inside it
                run = load_run(cell_dir, warnings, name=cell["name"])
                run.optim = cell.get("optim", run.optim)
                run.seed = cell.get("seed", run.seed)
                run.settings = dict(cell.get("settings") or {})  # as the sweep named its cells: kept whole
                seed_suffix = f"_s{run.seed}"
                if cell["name"].endswith(seed_suffix):
                    run.sweep_group = cell["name"][:-len(seed_suffix)]
                if not run.complete and cell.get("state") not in (None, "done"):
                    run.problems.append(f"sweep state {cell['state']}" + (f": {cell['error']}"
                                                                          if cell.get("error") else ""))
                runs.setdefault(cell_dir.resolve(), run)
        elif _is_run_dir(path):
            runs.setdefault(path.resolve(), load_run(path, warnings))
        else:
            children = sorted(d for d in path.iterdir() if d.is_dir() and _is_run_dir(d))
            if not children:
                raise UserError(f"{path}: neither a run directory (config.yaml, eval.json) nor a sweep directory "
                                f"(sweep.json, or run directories inside)")
            for child in children:
                runs.setdefault(child.resolve(), load_run(child, warnings))
    return list(runs.values()), sweeps

