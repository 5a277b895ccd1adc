"""compare.json's content from loaded runs: groups, their numbers and differences, trends, best-config."""

from __future__ import annotations

from typing import Any

from dopr_robot import stats
from dopr_robot.errors import UserError
from dopr_robot.experiments.compare.analysis import (difference, no_difference, perturbation_curves,
                                                     perturbation_differences, perturbation_levels,
                                                     select_best_config, summarize)
from dopr_robot.experiments.compare.groups import Group, assign_settings, baseline_map, make_groups
from dopr_robot.experiments.compare.protocol import check_protocols, check_seeds
from dopr_robot.experiments.compare.runs import Run
from dopr_robot.experiments.compare.trends import grid_panels

SELECTIONS = ("same-config", "best-config")


# ---------------------------------------------------------------- the report

def build_report(runs: list[Run], baseline: str | None = None, select: str = "same-config", last_n: int = 5,
                 n_boot: int = 10_000, seed: int = 0, split_protocols: bool = False,
                 metric: str = "success") -> dict[str, Any]:
    """compare.json's content from loaded runs (no file is read or written; fills each run's settings/group).
    Runs of different protocols are refused, or compared apart with `split_protocols` (see `protocol`). Every
    number is of `metric` per episode (success, return or normalized_return; the runs were read for it by
    `discover`), except validation loss and in-training success."""
    if select not in SELECTIONS:
        raise UserError(f"--select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    if last_n < 1 or n_boot < 1:
        raise UserError("need --last-n >= 1 and --n-boot >= 1")
    varying = assign_settings(runs)
    protocols = check_protocols(runs, split_protocols)
    groups = make_groups(runs, metric)
    if not groups:
        raise UserError("no complete run (with eval.json) to compare: "
                        + "; ".join(f"{r.dir}: {', '.join(r.problems)}" for r in runs[:5]))
    check_seeds(groups)
    notes: list[str] = []
    summaries = {g.name: {**summarize(g, last_n), "protocol": g.protocol} for g in groups}
    levels = {g.name: perturbation_levels(g, notes) for g in groups}
    curves = {g.name: perturbation_curves(levels[g.name], metric) for g in groups}
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
            entry.update(no_difference(base.name if base else None))
            if curves[g.name]:
                entry["perturbation"] = curves[g.name]  # without differences (a best-config copy may have some)
            if base is not None and base is not g:
                entry.update(difference(base.sample(), g.sample(), n_boot, seed))
                if curves[g.name]:
                    entry["perturbation"] = perturbation_differences(g.name, curves[g.name], levels[g.name],
                                                                     base.name, levels[base.name], n_boot, seed,
                                                                     metric)

    add_diffs(summaries, groups, mapping)
    grid = grid_panels(groups, summaries, notes, seed)
    report: dict[str, Any] = {
        "baseline": baseline, "select": select, "metric": metric,
        "groups": [summaries[g.name] for g in groups],
        "settings_keys": sorted({k for g in groups for k in g.settings} | set(varying)),
        "incomplete": [{"run": str(r.dir), "group": r.group, "reason": "; ".join(r.problems)}
                       for r in runs if not r.complete],
        "statistics": {"interval": {"level": 0.95, "method": "Welch t interval on per-seed means (diff_ci); for "
                                    "success each group's variance at least a seed's binomial variance q(1-q)/n",
                                    "few_seeds": f"few_seeds: fewer than {stats.FEW_SEEDS} training seeds in a group"},
                       "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95,
                                     "method": "hierarchical: training seeds, then episodes within seed "
                                               "(diff_ci_bootstrap; percentile, under-covers at 2-3 seeds)"},
                       "permutation": {"exact_limit": stats.EXACT_PERMUTATION_LIMIT, "seed": seed,
                                       "statistic": f"difference of mean per-seed {metric}, two-sided",
                                       "min_p": "p_permutation_min: the smallest p these group sizes allow"},
                       "paired": "sign-flip over episode seeds (exact for success: McNemar for one run per group; "
                                 f"exact up to {stats.EXACT_SIGN_FLIP_EPISODES} episodes, else seeded Monte Carlo, "
                                 "for returns); p_paired_min: the smallest p it allows",
                       f"{metric}_sd": "sample standard deviation over training seeds (ddof 1)"},
        "protocols": protocols,
        "errored_episodes": [e for r in runs for e in r.errored],
        "grid": grid,
        "notes": notes,
    }
    if report["errored_episodes"]:
        n = sum(e["n_errors"] for e in report["errored_episodes"])
        notes.append(f"--allow-errors: {n} errored episode(s) in {len(report['errored_episodes'])} report(s) are "
                     f"missing, not failures; those runs' rates are over their completed episodes "
                     f"(errored_episodes in compare.json)")
    if select == "best-config":
        chosen = select_best_config(groups, summaries)
        entries = {g.name: {**summaries[g.name], "selection_score": summaries[g.name]["intrain_last_mean"],
                            "candidates": {c.name: summaries[c.name]["intrain_last_mean"]
                                           for c in groups if c.optim == g.optim}}
                   for g in chosen.values()}
        chosen_list = sorted(chosen.values(), key=lambda g: g.name)
        base_of = baseline_map(chosen_list, baseline)  # one chosen group per optimizer and protocol
        if not base_of:
            notes.append(f"best-config: no selected {baseline!r} group, no differences computed")
        add_diffs(entries, chosen_list, base_of)
        report["best_config"] = {
            "criterion": f"highest mean over training seeds of the last {last_n} in-training "
                         f"{'success' if metric == 'success' else 'mean-return'} evaluations (selection seeds, "
                         f"metrics.jsonl); reported on the held-out seeds",
            "groups": [entries[g.name] for g in chosen_list]}
    return report

