"""`dopr-robot compare`: group finished runs by optimizer and grid point, and test their success differences.

Inputs are run directories (RUN/config.yaml, metrics.jsonl, eval.json, eval_best.json, eval_<tag>.json,
drift.json) or sweep directories (DIR/sweep.json listing its cells; a directory of run directories works too).
A group is one optimizer at one grid point; its runs are its training seeds. Settings come from sweep.json when
present, else from the keys in which the runs' config.yaml differ (bookkeeping keys such as the seed, the device
and the `eval` section excluded; `optim.ap.*` dropped for optimizers without AP).

Per group, success is the mean over training seeds of each run's held-out success rate (eval.json, the final
checkpoint); the differences to the baseline group come with a hierarchical bootstrap interval, an exact
permutation test over training seeds and, when every run played the same episode seeds, an exact paired
sign-flip test over episode seeds (see `dopr_robot.experiments.stats`). Perturbed reports (eval_<tag>.json) give
success per perturbation kind and level, each level compared with the baseline group's runs at the same kind and
level by the same `difference` (level 0 is eval.json). A run without eval.json is listed as incomplete and left
out of the statistics, never an error. Where a numeric setting varies within an optimizer,
`grid` holds success against it (plot (e); see `grid_panels`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from dopr_robot.errors import UserError
from dopr_robot.experiments import stats
from dopr_robot.fileio import write_json, write_text
from dopr_robot.provenance import provenance
from dopr_robot.rundir import DRIFT_REPORT, read_metrics

# Config keys that do not define a group: the seed is the replicate, the rest is bookkeeping or evaluation.
IGNORED_KEYS = {"optim.name", "train.seed", "train.device", "train.threads", "train.logger",
                "train.checkpoint_every", "train.log_every", "train.val_every"}
IGNORED_PREFIXES = ("eval.",)
PERTURBATION_KINDS = ("action_noise", "obs_noise", "push")
ARCHIVED_REPORT = re.compile(r"-\d{8}-\d{6}(-\d+)?$")  # eval*.json renamed aside by a later eval (kept, not current)
SELECTIONS = ("same-config", "best-config")


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
        return [r["val_loss"] for r in self.metrics if _finite(r.get("val_loss"))]

    def in_training_success(self) -> list[tuple[int, float]]:
        return [(r["step"], r["success"]) for r in self.metrics if _finite(r.get("success"))]


def _finite(x: Any) -> bool:
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

def _read_json(path: Path, warnings: list[str]) -> dict | None:
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


def _perturbation(report: dict) -> dict[str, float]:
    p = report.get("perturbation") or {}
    return {k: float(v) for k, v in p.items() if _finite(v)}


def _is_perturbed(report: dict) -> bool:
    p = _perturbation(report)
    return any(p.get(k, 0.0) != 0.0 for k in PERTURBATION_KINDS)


def _report_problem(report: dict) -> str | None:
    """Why an eval report cannot be used (None if it can): a success rate, episodes and, when it lists them, one
    {seed, success} record per episode."""
    if not _finite(report.get("success_rate")) or not isinstance(report.get("episodes"), int) \
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
    run.eval = _read_json(path / "eval.json", warnings)
    run.eval_best = _read_json(path / "eval_best.json", warnings)
    for report_path in sorted(path.glob("eval_*.json")):
        stem = report_path.stem
        if stem == "eval_best" or ARCHIVED_REPORT.search(stem):
            continue
        report = _read_json(report_path, warnings)
        if report is None or not _is_perturbed(report):
            continue
        problem = _report_problem(report)
        if problem:
            warnings.append(f"{report_path}: {problem}; ignored")
        else:
            run.perturbed.append(report)
    run.metrics = read_metrics(path / "metrics.jsonl", warnings)
    run.drift = _read_json(path / DRIFT_REPORT, warnings)
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
        if _is_perturbed(run.eval):
            warnings.append(f"{path / 'eval.json'}: a perturbed report ({_perturbation(run.eval)}); its success is "
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
            sweep = _read_json(sweep_file, warnings)
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


# ---------------------------------------------------------------- grouping

def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _applies(optim: str | None, key: str) -> bool:
    """AP settings mean nothing to optimizers without AP (they ignore the `optim.ap` block)."""
    return not (key.startswith("optim.ap.") and not (optim or "").startswith("dopr"))


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def assign_settings(runs: list[Run]) -> list[str]:
    """Fill `settings` of runs not from a sweep with the config keys that differ between runs (AP keys only for
    AP optimizers); returns those keys. Sweep cells keep the settings sweep.json gives them."""
    flat = {id(r): _flatten(r.config) for r in runs if r.settings is None and r.config is not None}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if not _ignored(k)
               and len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    for run in runs:
        if run.settings is None:
            f = flat.get(id(run), {})
            run.settings = {k: f.get(k) for k in varying if k in f and _applies(run.optim, k)}
    return varying


def _format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def group_name(optim: str, settings: dict[str, Any]) -> str:
    """<optim>[_<key>-<value>...] with key the last component of the dotted key, as sweep names its cells."""
    return optim + "".join(f"_{k.rsplit('.', 1)[-1]}-{_format_value(settings[k])}" for k in sorted(settings))


@dataclass
class Group:
    name: str
    optim: str
    settings: dict[str, Any]
    runs: list[Run]  # complete runs only

    def sample(self) -> Sample:
        """The group's unperturbed held-out results: each run's eval.json."""
        return Sample(self.name, [r.eval for r in self.runs])


@dataclass
class Sample:
    """What `difference` compares: one eval report per run of a group under one condition (eval.json, or the
    eval_<tag>.json of one perturbation kind and level), in the group's run order."""
    name: str  # the group's
    reports: list[dict[str, Any]]

    def outcomes(self) -> list[list[float]]:
        return [report_outcomes(r) for r in self.reports]

    def rates(self) -> list[float]:
        return [float(r["success_rate"]) for r in self.reports]

    def episode_seeds(self) -> list[list[int] | None]:
        return [report_episode_seeds(r) for r in self.reports]


def make_groups(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        run.group = run.sweep_group or group_name(run.optim or "unknown", run.settings or {})
        if run.complete:
            groups.setdefault(run.group, Group(run.group, run.optim, run.settings or {}, [])).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.seed if isinstance(r.seed, int) else 1 << 62, str(r.dir)))
    return sorted(groups.values(), key=lambda g: g.name)


# ---------------------------------------------------------------- per-group numbers

def summarize(group: Group, last_n: int) -> dict[str, Any]:
    """The numbers of one group over its training seeds (mean +- sample sd) and pooled over episodes."""
    rates = group.sample().rates()
    success_mean, success_sd = stats.mean_sd(rates)
    successes = sum(report_successes(r.eval) for r in group.runs)
    episodes = sum(int(r.eval["episodes"]) for r in group.runs)
    lo, hi = stats.wilson_interval(successes, episodes)
    best_rates = [float(r.eval_best["success_rate"]) for r in group.runs
                  if r.eval_best is not None and _finite(r.eval_best.get("success_rate"))]
    best_mean, best_sd = stats.mean_sd(best_rates)
    val_final = [r.val_losses()[-1] for r in group.runs if r.val_losses()]
    val_best = [min(r.val_losses()) for r in group.runs if r.val_losses()]
    intrain = [r.in_training_success() for r in group.runs]
    intrain_last = [float(np.mean([s for _, s in curve[-last_n:]])) for curve in intrain if curve]
    intrain_max = [max(s for _, s in curve) for curve in intrain if curve]
    val_mean, val_sd = stats.mean_sd(val_final)
    last_mean, last_sd = stats.mean_sd(intrain_last)
    return {
        "name": group.name, "optim": group.optim, "settings": group.settings,
        "runs": [str(r.dir) for r in group.runs],
        "train_seeds": [r.seed for r in group.runs],
        "n_seeds": len(group.runs),
        "success_mean": success_mean, "success_sd": success_sd, "success_per_seed": rates,
        "successes": successes, "episodes": episodes,
        "success_pooled": successes / episodes if episodes else None, "success_ci": [lo, hi],
        "best_success_mean": best_mean, "best_success_sd": best_sd, "best_n_seeds": len(best_rates),
        "val_loss_mean": val_mean, "val_loss_sd": val_sd,
        "val_loss_best_mean": stats.mean_sd(val_best)[0],
        "intrain_last_n": last_n, "intrain_last_mean": last_mean, "intrain_last_sd": last_sd,
        "intrain_n_seeds": len(intrain_last),
        "intrain_max_mean": stats.mean_sd(intrain_max)[0],
    }


def difference(baseline: Sample, group: Sample, n_boot: int, seed: int) -> dict[str, Any]:
    """diff of mean success vs the baseline, its bootstrap interval, and both tests (for the unperturbed eval and
    for each perturbation level alike)."""
    base_outcomes, group_outcomes = baseline.outcomes(), group.outcomes()
    boot = stats.hierarchical_bootstrap_diff(base_outcomes, group_outcomes, n_boot=n_boot, seed=seed)
    perm = stats.permutation_test(baseline.rates(), group.rates(), seed=seed)
    out: dict[str, Any] = {"baseline_group": baseline.name, "diff_vs_baseline": boot["diff"], "diff_ci": boot["ci"],
                           "p_permutation": perm["p"], "permutation": {k: perm[k] for k in
                                                                       ("method", "n_permutations", "seed")},
                           "p_paired": None, "paired": None}
    seeds = baseline.episode_seeds() + group.episode_seeds()
    if any(s is None for s in seeds):
        out["paired"] = {"skipped": "a report has no per-episode results"}
    elif any(s != seeds[0] for s in seeds):
        out["paired"] = {"skipped": "runs played different episode seeds"}
    else:
        paired = stats.paired_episode_test(base_outcomes, group_outcomes)
        out["p_paired"] = paired["p"]
        out["paired"] = {k: paired[k] for k in ("n_episodes", "n_discordant", "mean_diff", "method")}
    return out


def _strip_ap(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not k.startswith("optim.ap.")}


def baseline_map(groups: list[Group], baseline: str) -> dict[str, Group]:
    """Each group's baseline: the group named `baseline`; else the `baseline`-optimizer group with the same
    settings, else with the same settings apart from AP keys (which that optimizer ignores), else the only group
    of that optimizer."""
    by_name = {g.name: g for g in groups}
    if baseline in by_name:
        return {g.name: by_name[baseline] for g in groups}
    candidates = [g for g in groups if g.optim == baseline]
    mapping = {}
    for g in groups:
        for same in (lambda b: b.settings == g.settings, lambda b: _strip_ap(b.settings) == _strip_ap(g.settings)):
            matches = [b for b in candidates if same(b)]
            if len(matches) == 1:
                mapping[g.name] = matches[0]
                break
        else:
            if len(candidates) == 1:
                mapping[g.name] = candidates[0]
    return mapping


Levels = dict[str, dict[float, list[dict[str, Any]]]]  # kind -> level -> one report per run, in run order


def perturbation_levels(group: Group, notes: list[str]) -> Levels:
    """The group's reports per perturbation kind and level: its runs' eval_<tag>.json of the final checkpoint with
    one active perturbation (a push kind names its magnitude), and level 0, the unperturbed eval.json of the same
    runs. One report per run and level: when a run has several, the first by file name, with a note."""
    cells: Levels = {}
    for run in group.runs:
        taken: set[tuple[str, float]] = set()
        for report in run.perturbed:
            if report.get("checkpoint_name", "final") != run.eval.get("checkpoint_name", "final"):
                continue  # curves are of the final checkpoint, like eval.json's level 0
            p = _perturbation(report)
            active = [k for k in PERTURBATION_KINDS if p.get(k, 0.0) != 0.0]
            if len(active) != 1:
                continue  # combined perturbations have no single level axis
            kind, level = active[0], p[active[0]]
            if kind == "push":
                kind = f"push (magnitude {p.get('push_magnitude', 0.0):g})"
            if (kind, level) in taken:
                notes.append(f"run {run.dir}: several eval_<tag>.json at {kind} {level:g}; the first by file name "
                             f"is used")
                continue
            taken.add((kind, level))
            cells.setdefault(kind, {}).setdefault(level, []).append(report)
    zero = [r.eval for r in group.runs if not _is_perturbed(r.eval)]
    return {kind: {0.0: zero, **levels} if zero else levels for kind, levels in sorted(cells.items())}


def perturbation_curves(levels: Levels) -> dict[str, list[dict[str, Any]]]:
    """Success against perturbation level per kind (pooled with a Wilson interval, and mean ± sd over runs)."""
    out = {}
    for kind, by_level in levels.items():
        rows = []
        for level in sorted(by_level):
            reports = by_level[level]
            s, n = sum(report_successes(r) for r in reports), sum(int(r["episodes"]) for r in reports)
            mean, sd = stats.mean_sd([float(r["success_rate"]) for r in reports])
            rows.append({"level": level, "n_seeds": len(reports), "success_mean": mean, "success_sd": sd,
                         "success_pooled": s / n if n else None, "success_ci": list(stats.wilson_interval(s, n))})
        out[kind] = rows
    return out


def perturbation_differences(name: str, curves: dict[str, list[dict[str, Any]]], levels: Levels,
                             base_name: str, base_levels: Levels, n_boot: int,
                             seed: int) -> dict[str, list[dict[str, Any]]]:
    """The curves' rows (copies) with the difference to the baseline group at the same kind and level: the group's
    reports at that level against the baseline's, by `difference` (level 0 gives the group's main numbers). A level
    the baseline has no report at gets None and a `note`."""
    out = {}
    for kind, rows in curves.items():
        out[kind] = []
        for row in rows:
            base_reports = base_levels.get(kind, {}).get(row["level"])
            if base_reports:
                diff = difference(Sample(base_name, base_reports), Sample(name, levels[kind][row["level"]]),
                                  n_boot, seed)
                note = None
            else:
                diff = {"baseline_group": base_name, "diff_vs_baseline": None, "diff_ci": None,
                        "p_permutation": None, "permutation": None, "p_paired": None, "paired": None}
                note = f"baseline group {base_name} has no runs at {kind} {row['level']:g}"
            out[kind].append({**row, **diff, "note": note})
    return out


def _number(value: Any) -> float | None:
    """A finite number from a setting or config value (sweep.json keeps grid values as their texts), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if _finite(value) else None


def _config_value(group: Group, key: str) -> float | None:
    """The number every run of `group` has at `key` in its config.yaml (flattened), or None if they disagree."""
    values = set()
    for run in group.runs:
        x = _number(_flatten(run.config).get(key)) if run.config is not None else None
        if x is None:
            return None
        values.add(x)
    return values.pop() if len(values) == 1 else None


def grid_panels(groups: list[Group], summaries: dict[str, dict], notes: list[str], seed: int = 0
                ) -> list[dict[str, Any]]:
    """Success against each numeric setting key that varies within an optimizer, the data of plot (e).

    Per key, an optimizer's groups are split by their other settings; a part with a group that names the key
    becomes a series, one point per group at the key's value. A group of that optimizer without the key in its
    settings (a plain run at the config's value) joins the part of its settings at the value its runs'
    config.yaml hold, if they all agree (`from`: "config"). A panel needs some series with two or more distinct
    values. Groups of optimizers without a series whose settings lack the key, or to which it does not apply
    (AP keys for optimizers without AP), are the panel's horizontal `lines`. Each series with two or more
    distinct values gets `trend`: `stats.trend_test` of its runs' success on the value (log10 of it on a log
    panel), so a whole curve is one test."""
    baselines = {s.get("baseline_group") for s in summaries.values()}
    by_name = {g.name: g for g in groups}

    def numbers(g: Group, **extra) -> dict[str, Any]:
        s = summaries[g.name]
        return {**extra, "group": g.name, "n_seeds": s["n_seeds"], "success_pooled": s["success_pooled"],
                "success_ci": s["success_ci"], "success_mean": s["success_mean"], "success_sd": s["success_sd"]}

    keys = sorted({k for g in groups for k, v in g.settings.items() if _applies(g.optim, k) and _number(v) is not None})
    panels = []
    for key in keys:
        series, left_off = [], []
        for optim in sorted({g.optim for g in groups if _applies(g.optim, key)}):
            parts: dict[str, dict[str, Any]] = {}
            unplaced: dict[str, list[str]] = {}
            for g in (g for g in groups if g.optim == optim):
                if key in g.settings:
                    x, source = _number(g.settings[key]), "settings"
                    fixed = {k: v for k, v in g.settings.items() if k != key}
                else:
                    x, source, fixed = _config_value(g, key), "config", g.settings
                part_key = json.dumps(fixed, sort_keys=True, default=str)
                if x is None:
                    unplaced.setdefault(part_key, []).append(g.name)
                    continue
                part = parts.setdefault(part_key, {"optim": optim, "fixed": fixed, "points": []})
                part["points"].append(numbers(g, x=x, **{"from": source}))
            for part_key, part in parts.items():
                if any(p["from"] == "settings" for p in part["points"]):
                    part["points"].sort(key=lambda p: (p["x"], p["group"]))
                    series.append(part)
                    left_off += unplaced.get(part_key, [])
        if not any(len({p["x"] for p in s["points"]}) >= 2 for s in series):
            continue
        if left_off:
            notes.append(f"plot (e), {key}: group(s) {', '.join(left_off)} left off the curve (no single numeric "
                         f"value of {key}, in their settings or in all their runs' config.yaml)")
        with_series = {s["optim"] for s in series}
        lines = [numbers(g, optim=g.optim, baseline=g.name in baselines) for g in groups
                 if g.optim not in with_series and (key not in g.settings or not _applies(g.optim, key))]
        xs = [p["x"] for s in series for p in s["points"]]
        log_x = min(xs) > 0 and max(xs) >= 10 * min(xs)
        for s in series:
            s["trend"] = series_trend(s["points"], by_name, key, log_x, seed)
        panels.append({"key": key, "log_x": log_x, "series": series, "lines": lines})
    return panels


def series_trend(points: list[dict[str, Any]], groups: dict[str, Group], key: str, log_x: bool, seed: int
                 ) -> dict[str, Any] | None:
    """The trend test over every run of a series: each run's held-out success against its point's value."""
    xs, rates = [], []
    for p in points:
        run_rates = groups[p["group"]].sample().rates()
        xs += [math.log10(p["x"]) if log_x else p["x"]] * len(run_rates)
        rates += run_rates
    if len(set(xs)) < 2:
        return None
    return {**stats.trend_test(xs, rates, seed=seed), "x": f"log10({key})" if log_x else key}


def select_best_config(groups: list[Group], summaries: dict[str, dict]) -> dict[str, Group]:
    """Per optimizer, the grid point with the highest mean in-training success on the selection seeds (mean over
    training seeds of each run's last-N in-training evaluations); ties go to the first name in sorted order."""
    missing = [g.name for g in groups if summaries[g.name]["intrain_last_mean"] is None]
    if missing:
        raise UserError(f"--select best-config needs in-training success (train.eval_every > 0) in metrics.jsonl; "
                        f"missing in group(s): {', '.join(missing)}")
    chosen: dict[str, Group] = {}
    for g in groups:
        best = chosen.get(g.optim)
        if best is None or summaries[g.name]["intrain_last_mean"] > summaries[best.name]["intrain_last_mean"]:
            chosen[g.optim] = g
    return chosen


# ---------------------------------------------------------------- the report

def build_report(runs: list[Run], baseline: str | None = None, select: str = "same-config", last_n: int = 5,
                 n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """compare.json's content from loaded runs (no file is read or written; fills each run's settings/group)."""
    if select not in SELECTIONS:
        raise UserError(f"--select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    if last_n < 1 or n_boot < 1:
        raise UserError("need --last-n >= 1 and --n-boot >= 1")
    varying = assign_settings(runs)
    groups = make_groups(runs)
    if not groups:
        raise UserError("no complete run (with eval.json) to compare: "
                        + "; ".join(f"{r.dir}: {', '.join(r.problems)}" for r in runs[:5]))
    notes: list[str] = []
    summaries = {g.name: summarize(g, last_n) for g in groups}
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) != len(seeds):
            notes.append(f"group {g.name}: duplicate training seeds {seeds}")
    levels = {g.name: perturbation_levels(g, notes) for g in groups}
    curves = {g.name: perturbation_curves(levels[g.name]) for g in groups}
    for g in groups:
        if curves[g.name]:
            summaries[g.name]["perturbation"] = curves[g.name]
    explicit = baseline is not None
    baseline = baseline or "adam"
    mapping = baseline_map(groups, baseline)
    if not mapping:
        if explicit:
            raise UserError(f"--baseline {baseline!r}: no group of that name or optimizer "
                            f"(groups: {', '.join(g.name for g in groups)})")
        notes.append(f"no {baseline!r} group: no differences computed (pick one with --baseline)")

    def add_diffs(entries: dict[str, dict], chosen_groups: list[Group], base_of: dict[str, Group]) -> None:
        for g in chosen_groups:
            base = base_of.get(g.name)
            entry = entries[g.name]
            entry.update({"baseline_group": base.name if base else None, "diff_vs_baseline": None,
                          "diff_ci": None, "p_permutation": None, "permutation": None, "p_paired": None,
                          "paired": None})
            if curves[g.name]:
                entry["perturbation"] = curves[g.name]  # without differences (a best-config copy may have some)
            if base is not None and base is not g:
                entry.update(difference(base.sample(), g.sample(), n_boot, seed))
                if curves[g.name]:
                    entry["perturbation"] = perturbation_differences(g.name, curves[g.name], levels[g.name],
                                                                     base.name, levels[base.name], n_boot, seed)

    add_diffs(summaries, groups, mapping)
    grid = grid_panels(groups, summaries, notes, seed)
    report: dict[str, Any] = {
        "baseline": baseline, "select": select,
        "groups": [summaries[g.name] for g in groups],
        "settings_keys": sorted({k for g in groups for k in g.settings} | set(varying)),
        "incomplete": [{"run": str(r.dir), "group": r.group, "reason": "; ".join(r.problems)}
                       for r in runs if not r.complete],
        "statistics": {"bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95,
                                     "method": "hierarchical: training seeds, then episodes within seed"},
                       "permutation": {"exact_limit": stats.EXACT_PERMUTATION_LIMIT, "seed": seed,
                                       "statistic": "difference of mean per-seed success, two-sided"},
                       "paired": "exact sign-flip over episode seeds (McNemar for one run per group)",
                       "success_sd": "sample standard deviation over training seeds (ddof 1)"},
        "grid": grid,
        "notes": notes,
    }
    if select == "best-config":
        chosen = select_best_config(groups, summaries)
        entries = {g.name: {**summaries[g.name], "selection_score": summaries[g.name]["intrain_last_mean"],
                            "candidates": {c.name: summaries[c.name]["intrain_last_mean"]
                                           for c in groups if c.optim == g.optim}}
                   for g in chosen.values()}
        chosen_list = sorted(chosen.values(), key=lambda g: g.name)
        base = chosen.get(baseline) or next((g for g in chosen_list if g.name == baseline), None)
        if base is None:
            notes.append(f"best-config: no selected {baseline!r} group, no differences computed")
        add_diffs(entries, chosen_list, {g.name: base for g in chosen_list} if base else {})
        report["best_config"] = {
            "criterion": f"highest mean over training seeds of the last {last_n} in-training success evaluations "
                         f"(selection seeds, metrics.jsonl); reported on the held-out seeds (eval.json)",
            "groups": [entries[g.name] for g in chosen_list]}
    return report


# ---------------------------------------------------------------- tables

def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _pm(mean: float | None, sd: float | None, pct: bool = True) -> str:
    if mean is None:
        return "-"
    if pct:
        return _pct(mean) + (f" ± {100 * sd:.1f}" if sd is not None else "")
    return f"{mean:.4g}" + (f" ± {sd:.2g}" if sd is not None else "")


def _p(p: float | None) -> str:
    return "-" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns, so it reads in a terminal too."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _diff(e: dict[str, Any]) -> str:
    if e.get("diff_vs_baseline") is None:
        return "-"
    lo, hi = e["diff_ci"]
    return f"{100 * e['diff_vs_baseline']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _pooled(e: dict[str, Any]) -> str:
    lo, hi = e["success_ci"]
    return f"{_pct(e['success_pooled'])} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _has_baseline(e: dict[str, Any]) -> bool:
    return e.get("baseline_group") not in (None, e["name"])


def table(entries: list[dict[str, Any]], last_n: int) -> str:
    """A markdown table (aligned, so it reads in a terminal too)."""
    header = ["group", "seeds", "val loss (final)", "val loss (best)", "success final", "pooled [Wilson 95%]",
              "success best ckpt", f"in-train last {last_n}", "diff vs baseline [95% CI]", "p perm", "p paired"]
    rows = []
    for e in entries:
        diff = "baseline" if e.get("baseline_group") == e["name"] else _diff(e)
        rows.append([e["name"], str(e["n_seeds"]), _pm(e["val_loss_mean"], e["val_loss_sd"], pct=False),
                     "-" if e["val_loss_best_mean"] is None else f"{e['val_loss_best_mean']:.4g}",
                     _pm(e["success_mean"], e["success_sd"]), _pooled(e),
                     _pm(e["best_success_mean"], e["best_success_sd"]),
                     _pm(e["intrain_last_mean"], e["intrain_last_sd"]), diff,
                     _p(e.get("p_permutation")), _p(e.get("p_paired"))])
    return _aligned(header, rows)


def perturbation_tables(entries: list[dict[str, Any]]) -> list[str]:
    """Per perturbation kind, a markdown table: one row per level; per group its pooled success [Wilson 95%] and,
    for a group with a baseline, its difference to it at that level with both p-values."""
    kinds = sorted({k for e in entries for k in e.get("perturbation") or {}})
    parts: list[str] = []
    for kind in kinds:
        present = [e for e in entries if (e.get("perturbation") or {}).get(kind)]
        by_level = [{r["level"]: r for r in e["perturbation"][kind]} for e in present]
        header = ["level"]
        for e in present:
            header.append(f"{e['name']} [Wilson 95%]")
            if _has_baseline(e):
                header += [f"{e['name']} vs {e['baseline_group']} [95% CI]", "p perm", "p paired"]
        rows = []
        for level in sorted({lv for rows_of in by_level for lv in rows_of}):
            cells = [f"{level:g}"]
            for e, rows_of in zip(present, by_level):
                r = rows_of.get(level)
                cells.append("-" if r is None else _pooled(r))
                if _has_baseline(e):
                    diff = "-" if r is None else ("no baseline runs" if r.get("note") else _diff(r))
                    cells += [diff, _p(r and r.get("p_permutation")), _p(r and r.get("p_paired"))]
            rows.append(cells)
        parts += ["", f"### {kind}", "", _aligned(header, rows)]
    return parts


def trend_table(trends: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    header = ["setting", "optimizer", "values", "runs", "slope", "p perm"]
    rows = []
    for panel, s in trends:
        fixed = ", ".join(f"{k}={v}" for k, v in sorted(s["fixed"].items()))
        values = ", ".join(f"{p['x']:g}" for p in s["points"])
        rows.append([panel["key"], s["optim"] + (f" ({fixed})" if fixed else ""), values,
                     str(s["trend"]["n_runs"]), stats.trend_label(s["trend"]), _p(s["trend"]["p"])])
    return _aligned(header, rows)


def format_markdown(report: dict[str, Any]) -> str:
    last_n = report["groups"][0]["intrain_last_n"]
    parts = [f"# compare: baseline {report['baseline']}", "",
             "Success: held-out seeds (eval.json, final checkpoint), mean ± sd over training seeds; pooled over "
             "all episodes with a Wilson 95% interval. diff: mean success minus the baseline group's, hierarchical "
             f"bootstrap 95% interval (B = {report['statistics']['bootstrap']['n_boot']}, seed "
             f"{report['statistics']['bootstrap']['seed']}); p perm: permutation test over training seeds; "
             "p paired: sign-flip test over shared episode seeds.", "",
             "## Same configuration", "", table(report["groups"], last_n)]
    trends = [(panel, s) for panel in report.get("grid", []) for s in panel["series"] if s.get("trend")]
    if trends:
        parts += ["", "## Trend over a swept setting", "",
                  "Least-squares slope of per-seed held-out success on the setting (on log10 of it for a log-spaced "
                  "sweep: the change per decade), over every run of the curve; p perm: permutation test of the "
                  "slope (runs' success reassigned across the setting values).", "",
                  trend_table(trends)]
    if any(g.get("perturbation") for g in report["groups"]):
        parts += ["", "## Success under perturbation", "",
                  "Per perturbation level (eval_<tag>.json of the final checkpoint; level 0 is eval.json): pooled "
                  "success [Wilson 95%], and the difference to the baseline group's runs at the same kind and level "
                  "with the same bootstrap interval and tests as above (level 0 repeats the main difference)."]
        parts += perturbation_tables(report["groups"])
    if "best_config" in report:
        parts += ["", "## Best configuration per optimizer", "", report["best_config"]["criterion"] + ".", "",
                  table(report["best_config"]["groups"], last_n)]
    if report["incomplete"]:
        parts += ["", "## Incomplete runs (left out)", ""]
        parts += [f"- {i['run']}: {i['reason']}" for i in report["incomplete"]]
    if report["notes"]:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the command

def default_out(paths: Sequence[Path]) -> Path:
    if len(paths) == 1:
        return Path(paths[0]) / "compare"
    raise UserError("several inputs: pass --out DIR for compare's outputs")


def compare(paths: Sequence[Path], baseline: str | None = None, select: str = "same-config",
            out: Path | None = None, last_n: int = 5, n_boot: int = 10_000, seed: int = 0,
            command: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read the runs, compute the report, write OUT/compare.json, compare.md and the plots.
    Returns (report, warnings)."""
    from dopr_robot import plotting

    out = Path(out) if out is not None else default_out(paths)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    warnings: list[str] = []
    runs, sweeps = discover(paths, warnings)
    report = build_report(runs, baseline, select, last_n, n_boot, seed)
    for run in runs:
        if not run.complete:
            warnings.append(f"{run.dir}: incomplete ({'; '.join(run.problems)}), left out")
    report["inputs"] = {"paths": [str(p) for p in paths], "sweeps": sweeps}
    report["provenance"] = provenance(command=command if command is not None else sys.argv)
    groups = make_groups(runs)
    report["plots"], plot_notes = plotting.compare_plots(groups, report, out)
    report["notes"] += plot_notes
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", format_markdown(report))
    return report, warnings
