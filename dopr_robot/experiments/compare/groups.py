"""Grouping runs: a group is one optimizer at one grid point, its runs are its training seeds; and each group's
baseline group."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dopr_robot.config import applies_to_optimizer
from dopr_robot.experiments.compare.runs import Run, report_episode_seeds, report_rate, report_values

# Config keys that do not define a group: the seed is the replicate, the rest is bookkeeping or evaluation.
IGNORED_KEYS = {"optim.name", "train.seed", "train.device", "train.threads", "train.logger",
                "train.checkpoint_every", "train.log_every", "train.val_every"}
IGNORED_PREFIXES = ("eval.",)
# Settings that change the protocol (the training data): a group is only ever compared with groups of its value
PROTOCOL_SETTINGS = ("data.path",)


# ---------------------------------------------------------------- grouping

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def applies(optim: str | None, key: str) -> bool:
    """Whether a setting can matter to `optim`'s runs (the AP block to AP optimizers, Muon's keys not to AdamW): the
    rule by which a sweep runs such cells once (`config.applies_to_optimizer`)."""
    return applies_to_optimizer(optim or "", key)


def ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def assign_settings(runs: list[Run]) -> list[str]:
    """Fill `settings` of runs not from a sweep with the config keys that differ between runs (AP keys only for
    AP optimizers); returns those keys. Sweep cells keep the settings sweep.json gives them."""
    flat = {id(r): flatten(r.config) for r in runs if r.settings is None and r.config is not None}
    keys = sorted({k for f in flat.values() for k in f})
    varying = [k for k in keys if not ignored(k)
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
    metric: str = "success"
    protocol: int = 0  # index into the comparison's protocols (several only with --split-protocols)

    def sample(self) -> Sample:
        """The group's unperturbed held-out results: each run's eval.json."""
        return Sample(self.name, [r.eval for r in self.runs], self.metric)


@dataclass
class Sample:
    """What `difference` compares: one eval report per run of a group under one condition (eval.json, or the
    eval_<tag>.json of one perturbation kind and level), in the group's run order, read as `metric`."""
    name: str  # the group's
    reports: list[dict[str, Any]]
    metric: str = "success"

    def values(self) -> list[list[float]]:
        """Per run, the per-episode values of the metric over its completed episodes."""
        return [report_values(r, self.metric) for r in self.reports]

    def rates(self) -> list[float]:
        """Per run, the mean of the metric over its completed episodes (the success rate for success)."""
        return [report_rate(r, self.metric) for r in self.reports]

    def episode_seeds(self) -> list[list[int] | None]:
        return [report_episode_seeds(r) for r in self.reports]


def make_groups(runs: list[Run], metric: str = "success") -> list[Group]:
    """Complete runs grouped by name (a sweep cell's name without `_s<seed>`, else optimizer and settings) and
    protocol (`Run.protocol`; with several, under --split-protocols, the name is suffixed `@p<index>`)."""
    several = len({r.protocol for r in runs if r.complete}) > 1
    groups: dict[str, Group] = {}
    for run in runs:
        run.group = run.sweep_group or group_name(run.optim or "unknown", run.settings or {})
        if several and run.complete:
            run.group += f"@p{run.protocol}"
        if run.complete:
            groups.setdefault(run.group, Group(run.group, run.optim, run.settings or {}, [], metric,
                                               run.protocol)).runs.append(run)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r.seed if isinstance(r.seed, int) else 1 << 62, str(r.dir)))
    return sorted(groups.values(), key=lambda g: g.name)


def _strip_ap(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not k.startswith("optim.ap.")}


def _unsuffixed(group: Group) -> str:
    suffix = f"@p{group.protocol}"
    return group.name[:-len(suffix)] if group.name.endswith(suffix) else group.name


def baseline_map(groups: list[Group], baseline: str) -> dict[str, Group]:
    """Each group's baseline, always of the same protocol: the group named `baseline` (with or without its
    `@p<k>` suffix); else, among the `baseline`-optimizer groups with the same training data setting, the group
    with the same settings, else with the same settings apart from AP keys (which that optimizer ignores), else
    the only one."""
    mapping = {}
    for g in groups:
        peers = [b for b in groups if b.protocol == g.protocol]
        named = [b for b in peers if baseline in (b.name, _unsuffixed(b))]
        if named:
            mapping[g.name] = named[0]
            continue
        candidates = [b for b in peers if b.optim == baseline
                      and all(b.settings.get(k) == g.settings.get(k) for k in PROTOCOL_SETTINGS)]
        for same in (lambda b: b.settings == g.settings, lambda b: _strip_ap(b.settings) == _strip_ap(g.settings)):
            matches = [b for b in candidates if same(b)]
            if len(matches) == 1:
                mapping[g.name] = matches[0]
                break
        else:
            if len(candidates) == 1:
                mapping[g.name] = candidates[0]
    return mapping
