"""Success against a numeric setting swept within an optimizer (plot (e)) and its one trend test per curve."""

from __future__ import annotations

import json
import math
from typing import Any

from dopr_robot import stats
from dopr_robot.experiments.compare.groups import Group, applies, flatten
from dopr_robot.experiments.compare.runs import finite

def _number(value: Any) -> float | None:
    """A finite number from a setting or config value (sweep.json keeps grid values as their texts), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if finite(value) else None


def _config_value(group: Group, key: str) -> float | None:
    """The number every run of `group` has at `key` in its config.yaml (flattened), or None if they disagree."""
    values = set()
    for run in group.runs:
        x = _number(flatten(run.config).get(key)) if run.config is not None else None
        if x is None:
            return None
        values.add(x)
    return values.pop() if len(values) == 1 else None


def grid_panels(groups: list[Group], summaries: dict[str, dict], notes: list[str], seed: int = 0
                ) -> list[dict[str, Any]]:
    """The metric (success by default) against each numeric setting key that varies within an optimizer, the
    data of plot (e).

    Per key, an optimizer's groups are split by their other settings; a part with a group that names the key
    becomes a series, one point per group at the key's value. A group of that optimizer without the key in its
    settings (a plain run at the config's value) joins the part of its settings at the value its runs'
    config.yaml hold, if they all agree (`from`: "config"). A panel needs some series with two or more distinct
    values. Groups of optimizers without a series whose settings lack the key, or to which it does not apply
    (AP keys for optimizers without AP), are the panel's horizontal `lines`. Each series with two or more
    distinct values gets `trend`: `stats.trend_test` of its runs' metric on the value (log10 of it on a log
    panel), so a whole curve is one test."""
    baselines = {s.get("baseline_group") for s in summaries.values()}
    by_name = {g.name: g for g in groups}

    def numbers(g: Group, **extra) -> dict[str, Any]:
        s = summaries[g.name]
        return {**extra, "group": g.name, "n_seeds": s["n_seeds"],
                **{f"{g.metric}_{k}": s[f"{g.metric}_{k}"] for k in ("pooled", "ci", "mean", "sd")}}

    keys = sorted({k for g in groups for k, v in g.settings.items() if applies(g.optim, k) and _number(v) is not None})
    panels = []
    for key in keys:
        series, left_off = [], []
        for optim in sorted({g.optim for g in groups if applies(g.optim, key)}):
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
                 if g.optim not in with_series and (key not in g.settings or not applies(g.optim, key))]
        xs = [p["x"] for s in series for p in s["points"]]
        log_x = min(xs) > 0 and max(xs) >= 10 * min(xs)
        for s in series:
            s["trend"] = series_trend(s["points"], by_name, key, log_x, seed)
        panels.append({"key": key, "log_x": log_x, "series": series, "lines": lines})
    return panels


def series_trend(points: list[dict[str, Any]], groups: dict[str, Group], key: str, log_x: bool, seed: int
                 ) -> dict[str, Any] | None:
    """The trend test over every run of a series: each run's held-out mean of the metric against its point's
    value."""
    xs, rates = [], []
    for p in points:
        run_rates = groups[p["group"]].sample().rates()
        xs += [math.log10(p["x"]) if log_x else p["x"]] * len(run_rates)
        rates += run_rates
    if len(set(xs)) < 2:
        return None
    return {**stats.trend_test(xs, rates, seed=seed), "x": f"log10({key})" if log_x else key,
            "metric": groups[points[0]["group"]].metric}

