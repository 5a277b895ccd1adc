"""One protocol per comparison: runs are compared only with runs evaluated the same way.

A run's protocol is what its held-out eval.json and the sweep that listed it record: the task (`env_name`), the
training dataset's sha256, `max_steps`, `seed_start`, the episode count, the checkpoint name, the perturbation,
and the sweep's config sha256 and `--set` items (bookkeeping keys such as `train.device` or `train.threads` left
out: they are not the experiment). A field a run does not record (an older report, a run not given through its
sweep directory) is not checked for that run. A field whose setting is swept (`data.path` for the dataset) may
differ between runs of different values of that setting, never within one.

Runs that disagree on a field are refused with one line naming the field, or, with --split-protocols, split into
one comparison per protocol (groups named `<group>@p<k>`, each compared only with a baseline of its protocol).
Two runs of one group with the same training seed are an error: a group's runs are its training seeds.
"""

from __future__ import annotations

import json
from typing import Any

from dopr_robot.errors import UserError
from dopr_robot.experiments.compare.groups import PROTOCOL_SETTINGS, Group, ignored
from dopr_robot.experiments.compare.runs import PERTURBATION_KINDS, Run, perturbation_of

PROTOCOL_FIELDS = ("env_name", "dataset_sha256", "max_steps", "seed_start", "episodes", "checkpoint_name",
                   "perturbation", "sweep_config_sha256", "sweep_set")
SWEPT_BY = {"dataset_sha256": PROTOCOL_SETTINGS[0]}  # a field that follows a setting: checked within each value


def protocol_of(run: Run) -> dict[str, Any]:
    """The protocol fields of a complete run (None where it does not record one)."""
    report = run.eval
    p = perturbation_of(report)
    perturbation = {k: p.get(k, 0.0) for k in PERTURBATION_KINDS}
    if perturbation["push"]:
        perturbation["push_magnitude"] = p.get("push_magnitude")
    sweep = run.sweep or {}
    sets = sweep.get("set")
    return {
        "env_name": report.get("env_name"), "dataset_sha256": run.dataset_sha256,
        "max_steps": report.get("max_steps"), "seed_start": report.get("seed_start"),
        "episodes": report.get("episodes"), "checkpoint_name": report.get("checkpoint_name"),
        "perturbation": perturbation,
        "sweep_config_sha256": sweep.get("config_sha256"),
        "sweep_set": sorted(item for item in sets if not ignored(str(item).partition("=")[0].strip()))
        if isinstance(sets, list) else None,
    }


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _conflicts(runs: list[Run], fields: dict[int, dict[str, Any]]) -> list[tuple[str, Run, Run]]:
    """(field, run, other run) for each field on which two runs that must agree do not (the first pair found)."""
    out = []
    for name in PROTOCOL_FIELDS:
        seen: dict[str, tuple[str, Run]] = {}  # value of the swept setting (or "") -> first value and its run
        for run in runs:
            value = fields[id(run)][name]
            if value is None:
                continue
            scope = _key((run.settings or {}).get(SWEPT_BY[name])) if name in SWEPT_BY else ""
            first = seen.setdefault(scope, (_key(value), run))
            if first[0] != _key(value):
                out.append((name, first[1], run))
                break
    return out


def check_protocols(runs: list[Run], split: bool) -> list[dict[str, Any]]:
    """The comparison's protocols ([fields, ...]); sets each complete run's `protocol` index into them.

    Without `split`, runs that disagree on a protocol field are a UserError naming the field; with it, runs are
    partitioned by the values of the fields that disagree."""
    complete = [r for r in runs if r.complete]
    fields = {id(r): protocol_of(r) for r in complete}
    conflicts = _conflicts(complete, fields)
    if conflicts and not split:
        name, a, b = conflicts[0]
        raise UserError(f"protocol field {name} differs: {a.dir} has {fields[id(a)][name]!r}, {b.dir} has "
                        f"{fields[id(b)][name]!r}; compare runs of one protocol, or pass --split-protocols")
    differing = [name for name, _, _ in conflicts]
    partitions: dict[str, int] = {}
    for run in complete:
        run.protocol = partitions.setdefault(_key([fields[id(run)][name] for name in differing]), len(partitions))
    protocols = []
    for k in range(len(partitions)):
        members = [r for r in complete if r.protocol == k]
        protocols.append({"index": k, "runs": len(members),
                          "fields": {name: _common(fields, members, name) for name in PROTOCOL_FIELDS},
                          "differs_in": differing})
    return protocols


def _common(fields: dict[int, dict[str, Any]], runs: list[Run], name: str) -> Any:
    """The value the runs share for a field (None if none records it; "varies with <setting>" if it follows a
    swept setting and takes several values)."""
    values = {_key(fields[id(r)][name]): fields[id(r)][name] for r in runs if fields[id(r)][name] is not None}
    if len(values) > 1:
        return f"varies with {SWEPT_BY[name]}"
    return next(iter(values.values()), None)


def check_seeds(groups: list[Group]) -> None:
    """A group's runs are distinct training seeds: a seed twice (the same run given twice under two paths, or two
    sweeps' cells merged into one group) is a UserError."""
    for g in groups:
        seen: dict[Any, Run] = {}
        for run in g.runs:
            if run.seed in seen:
                raise UserError(f"group {g.name}: training seed {run.seed} twice ({seen[run.seed].dir} and "
                                f"{run.dir}); a group's runs must be distinct training seeds")
            seen[run.seed] = run
