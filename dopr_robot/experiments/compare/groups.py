"""Grouping runs: a group is one optimizer at one grid point, its runs are its training seeds; and each group's
baseline group."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dopr_robot.experiments.compare.runs import Run, report_episode_seeds, report_outcomes

# Config keys that do not define a group: the seed is the replicate, the rest is bookkeeping or evaluation.
IGNORED_KEYS = {"optim.name", "train.seed", "train.device", "train.threads", "train.logger",
                "train.checkpoint_every", "train.log_every", "train.val_every"}
IGNORED_PREFIXES = ("eval.",)


# ---------------------------------------------------------------- grouping

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def applies(optim: str | None, key: str) -> bool:
    """AP settings mean nothing to optimizers without AP (they ignore the `optim.ap` block)."""
    return not (key.startswith("optim.ap.") and not (optim or "").startswith("dopr"))


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def assign_settings(runs: list[Run]) -> list[str]:
    """Fill `settings` of runs not from a sweep with the config keys that differ between runs (AP keys only for
    AP optimizers); returns those keys. Sweep cells keep the settings sweep.json gives them."""
    flat = {id(r): flatten(r.config) for r in runs if r.settings is None and r.config is not None}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if not _ignored(k)
               and len({json.dumps(f.get(k), sort_keys=True) for f in flat.values()}) > 1]
    for run in runs:
        if run.settings is None:
            f = flat.get(id(run), {})
            run.settings = {k: f.get(k) for k in varying if k in f and applies(run.optim, k)}
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

