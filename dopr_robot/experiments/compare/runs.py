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
from dopr_robot.stats import METRICS
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
    unusable: dict[str, str] = field(default_factory=dict)  # report file name -> why it was ignored
    errored: list[dict[str, Any]] = field(default_factory=list)  # reports with errored episodes (--allow-errors)
    dataset_sha256: str | None = None
    sweep: dict[str, Any] | None = None  # the identity of the sweep.json that listed this run, if one did
    protocol: int = 0  # index into the comparison's protocols (set by `protocol.check_protocols`)
    group: str = ""  # set by make_groups; a sweep cell's group is its name without the `_s<seed>` suffix
    sweep_group: str | None = None

    @property
    def complete(self) -> bool:
        return not self.problems

    def val_losses(self) -> list[float]:
        return [r["val_loss"] for r in self.metrics if finite(r.get("val_loss"))]

    def in_training(self, metric: str = "success") -> list[tuple[int, float]]:
        """(step, value) of the in-training rollouts on the selection seeds: their success rate, or for a return
        metric their mean return (a normalized return ranks runs of one dataset as the return does)."""
        key = "success" if metric == "success" else "return"
        return [(r["step"], r[key]) for r in self.metrics if finite(r.get(key))]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def report_errors(report: dict) -> int:
    """Episodes of an eval report that raised or timed out (missing, not failures): `n_errors`, else a legacy
    report's `errors` (which it had counted as failures), else its per-episode records with an `error`."""
    for key in ("n_errors", "errors"):
        if isinstance(report.get(key), int) and not isinstance(report.get(key), bool):
            return int(report[key])
    return sum(isinstance(e, dict) and "error" in e for e in report.get("per_episode") or [])


def completed_episodes(report: dict) -> list[dict] | None:
    """The per-episode records of the episodes that ran to an end (errored ones left out), or None for an older
    report without `per_episode`."""
    per_episode = report.get("per_episode")
    return None if not per_episode else [e for e in per_episode if "error" not in e]


def report_successes(report: dict) -> int:
    """Successful episodes of an eval report among its completed ones."""
    completed = completed_episodes(report)
    if completed is not None:
        return sum(bool(e["success"]) for e in completed)
    if isinstance(report.get("successes"), int):
        return int(report["successes"])
    return round(report["success_rate"] * report["episodes"])


def report_completed(report: dict) -> int:
    """How many episodes of an eval report completed (the denominator of its rates)."""
    completed = completed_episodes(report)
    return len(completed) if completed is not None else int(report["episodes"]) - report_errors(report)


def reference_scores(report: dict) -> tuple[float, float] | None:
    """The report's {"min", "max"} return references (normalized return = (return - min) / (max - min)), if
    usable."""
    ref = report.get("reference_scores")
    if isinstance(ref, dict) and finite(ref.get("min")) and finite(ref.get("max")) and ref["max"] != ref["min"]:
        return float(ref["min"]), float(ref["max"])
    return None


def report_values(report: dict, metric: str = "success") -> list[float]:
    """Per-episode values of `metric` over an eval report's completed episodes, in episode-seed order: success
    1.0 / 0.0, the episode's return, or its return normalized by the report's reference scores. A report without
    `per_episode` (older, success only) gives its count of successes first."""
    completed = completed_episodes(report)
    if metric == "success":
        if completed is not None:
            return [float(bool(e["success"])) for e in completed]
        k = report_successes(report)
        return [1.0] * k + [0.0] * (report_completed(report) - k)
    returns = [float(e["return"]) for e in completed or []]
    if metric == "return":
        return returns
    lo, hi = reference_scores(report)
    return [(r - lo) / (hi - lo) for r in returns]


def report_rate(report: dict, metric: str = "success") -> float:
    """The report's mean of `metric` over its completed episodes (its success rate for `success`)."""
    values = report_values(report, metric)
    return float(sum(values) / len(values))


def report_episode_seeds(report: dict) -> list[int] | None:
    """Seeds of the completed episodes, in the order of `report_values` (None without per-episode records)."""
    completed = completed_episodes(report)
    return None if completed is None else [int(e["seed"]) for e in completed]


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
    """Why an eval report cannot be used (None if it can): a success rate, episodes, when it lists them one
    {seed, success} record per episode (an errored one: {seed, error}), and at least one completed episode."""
    if not finite(report.get("success_rate")) or not isinstance(report.get("episodes"), int) \
            or report["episodes"] < 1:
        return "lacks success_rate/episodes"
    if not _valid_per_episode(report):
        return "per_episode is not one {seed, success} record per episode"
    if report_completed(report) < 1:
        return "has no completed episode"
    return None


def _valid_per_episode(report: dict) -> bool:
    per_episode = report.get("per_episode")
    if per_episode is None:
        return True  # older reports: counts only (no paired test for them)
    return isinstance(per_episode, list) and len(per_episode) == report["episodes"] and all(
        isinstance(e, dict) and isinstance(e.get("seed"), int) and ("success" in e or "error" in e)
        for e in per_episode)


def _check_metric(report: dict, path: Path, metric: str) -> None:
    """A report that cannot give `metric` per episode is refused (one line naming it), not left out."""
    if metric == "success":
        return
    completed = completed_episodes(report)
    if completed is None or not all(finite(e.get("return")) for e in completed):
        raise UserError(f"{path}: --metric {metric} needs a finite per-episode return in every completed episode "
                        f"(per_episode[].return); this report has none or not all")
    if metric == "normalized_return" and reference_scores(report) is None:
        raise UserError(f"{path}: --metric normalized_return needs the report's reference_scores {{min, max}} "
                        f"(recorded from the dataset's reference returns; robosuite datasets have none)")


def _check_errors(report: dict, path: Path, allow_errors: bool, run: Run) -> None:
    """Errored episodes are missing, not failures: a report with any is refused unless `allow_errors`, and then
    recorded (its rates are over its completed episodes)."""
    n_errors = report_errors(report)
    if n_errors == 0 and report.get("complete") is not False:
        return
    if not allow_errors:
        raise UserError(f"{path}: {n_errors} of {report.get('episodes')} episodes errored (missing, not policy "
                        f"failures); rerun them with `dopr-robot eval --resume`, or pass --allow-errors to compare "
                        f"over the completed episodes")
    run.errored.append({"report": str(path), "n_errors": n_errors, "episodes": report.get("episodes"),
                        "n_completed": report_completed(report)})


def _dataset_sha256(report: dict, run_dir: Path, warnings: list[str]) -> str | None:
    """The training dataset's sha256: from the report's provenance, else from RUN/provenance.json."""
    recorded = ((report.get("provenance") or {}).get("run") or read_json(run_dir / "provenance.json", warnings)
                or {})
    sha = (recorded.get("dataset") or {}).get("sha256") if isinstance(recorded, dict) else None
    return sha if isinstance(sha, str) else None


CHECKPOINTS = ("final", "best")  # whose held-out report a run is compared by


def load_run(path: Path, warnings: list[str], name: str | None = None, *, metric: str = "success",
             allow_errors: bool = False, checkpoint: str = "final") -> Run:
    """Read everything compare uses from one run directory (missing pieces become `problems`, not errors; a
    report with errored episodes, or without the per-episode values of `metric`, is a UserError). With
    `checkpoint` "best" the run's held-out report is eval_best.json (the checkpoint chosen on the selection
    seeds), and only perturbed reports of that checkpoint are read."""
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

    def usable(report_path: Path) -> dict | None:
        report = read_json(report_path, warnings)
        if report is None:
            return None
        problem = _report_problem(report)
        if problem:
            warnings.append(f"{report_path}: {problem}; ignored")
            run.unusable[report_path.name] = problem
            return None
        _check_errors(report, report_path, allow_errors, run)
        _check_metric(report, report_path, metric)
        return report

    held_out = "eval_best.json" if checkpoint == "best" else "eval.json"  # the one report the groups compare
    run.eval = usable(path / held_out)
    run.eval_best = usable(path / "eval_best.json") if checkpoint == "final" else None
    for report_path in sorted(path.glob("eval_*.json")):
        stem = report_path.stem
        if stem == "eval_best" or ARCHIVED_REPORT.search(stem):
            continue
        report = read_json(report_path, warnings)
        if report is not None and is_perturbed(report) and report.get("checkpoint_name", "final") == checkpoint:
            report = usable(report_path)
            if report is not None:
                run.perturbed.append(report)
    run.metrics = read_metrics(path / "metrics.jsonl", warnings)
    run.drift = read_json(path / DRIFT_REPORT, warnings)
    if run.config is not None:
        run.optim = (run.config.get("optim") or {}).get("name")
        run.seed = (run.config.get("train") or {}).get("seed")
    if run.eval is not None:
        run.optim = run.optim or run.eval.get("optim")
        run.seed = run.seed if run.seed is not None else run.eval.get("train_seed")
        if is_perturbed(run.eval):  # never read as the held-out success: eval --tag names perturbed reports
            run.problems.append(f"eval.json is a perturbed report ({perturbation_of(run.eval)}), not the held-out "
                                f"success; evaluate perturbations with `dopr-robot eval --tag`")
            run.eval = None
        else:
            run.dataset_sha256 = _dataset_sha256(run.eval, path, warnings)
    elif held_out in run.unusable:
        run.problems.append(f"{held_out} {run.unusable[held_out]}")
    elif checkpoint == "best":
        run.problems.append("no eval_best.json (dopr-robot eval RUN --checkpoint best)")
    elif not run.problems:
        run.problems.append("no eval.json (not evaluated yet)")
    if checkpoint == "final" and run.eval is not None and run.eval_best is None and \
            (path / "checkpoints" / "best.json").is_file():
        warnings.append(f"{path}: has a best checkpoint but no eval_best.json "
                        f"(dopr-robot eval {path} --checkpoint best)")
    if run.optim is None:
        run.problems.append("optimizer unknown (no config.yaml)")
    return run


def discover(paths: Sequence[Path], warnings: list[str], *, metric: str = "success",
             allow_errors: bool = False, checkpoint: str = "final") -> tuple[list[Run], list[dict]]:
    """Runs under `paths` (run dirs, sweep dirs with sweep.json, or dirs of run dirs) and the sweep.json files."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if checkpoint not in CHECKPOINTS:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, not {checkpoint!r}")
    read = {"metric": metric, "allow_errors": allow_errors, "checkpoint": checkpoint}
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
                run = load_run(cell_dir, warnings, name=cell["name"], **read)
                run.sweep = {"path": str(sweep_file), "config_sha256": sweep.get("config_sha256"),
                             "set": sweep.get("set")}
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
            runs.setdefault(path.resolve(), load_run(path, warnings, **read))
        else:
            children = sorted(d for d in path.iterdir() if d.is_dir() and _is_run_dir(d))
            if not children:
                raise UserError(f"{path}: neither a run directory (config.yaml, eval.json) nor a sweep directory "
                                f"(sweep.json, or run directories inside)")
            for child in children:
                runs.setdefault(child.resolve(), load_run(child, warnings, **read))
    return list(runs.values()), sweeps

