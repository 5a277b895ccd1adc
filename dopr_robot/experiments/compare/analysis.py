"""Statistics of groups: each group's numbers over its training seeds, its differences to its baseline group
(unperturbed and per perturbation level), and the best-config selection."""

from __future__ import annotations

from typing import Any

import numpy as np

from dopr_robot import stats
from dopr_robot.errors import UserError
from dopr_robot.experiments.compare.groups import Group, Sample
from dopr_robot.experiments.compare.runs import (PERTURBATION_KINDS, is_perturbed, perturbation_of, report_rate,
                                                 report_successes)

# ---------------------------------------------------------------- per-group numbers

def over_runs(sample: Sample) -> dict[str, Any]:
    """The metric of one sample over its runs: mean ± sample sd over training seeds, and pooled over every
    completed episode with a 95% interval that treats episodes as independent (Wilson for success, a t interval
    for returns). Keys are prefixed by the metric: success_mean, return_pooled, ..."""
    m = sample.metric
    values = sample.values()
    mean, sd = stats.mean_sd(sample.rates())
    episodes = sum(len(v) for v in values)
    out = {f"{m}_mean": mean, f"{m}_sd": sd, "episodes": episodes}
    if m == "success":
        successes = sum(report_successes(r) for r in sample.reports)
        out.update(successes=successes, success_pooled=successes / episodes,
                   success_ci=list(stats.wilson_interval(successes, episodes)))
    else:
        pooled = stats.mean_interval([x for v in values for x in v])
        out.update({f"{m}_pooled": pooled["mean"], f"{m}_ci": pooled["ci"]})
    return out


def summarize(group: Group, last_n: int) -> dict[str, Any]:
    """The numbers of one group over its training seeds (mean +- sample sd) and pooled over episodes, in the
    group's metric; validation loss and the in-training rollouts (success, or mean return for a return metric) from
    metrics.jsonl."""
    m = group.metric
    sample = group.sample()
    best_rates = [report_rate(r.eval_best, m) for r in group.runs if r.eval_best is not None]
    best_mean, best_sd = stats.mean_sd(best_rates)
    val_final = [r.val_losses()[-1] for r in group.runs if r.val_losses()]
    val_best = [min(r.val_losses()) for r in group.runs if r.val_losses()]
    intrain = [r.in_training(m) for r in group.runs]
    intrain_last = [float(np.mean([s for _, s in curve[-last_n:]])) for curve in intrain if curve]
    intrain_max = [max(s for _, s in curve) for curve in intrain if curve]
    val_mean, val_sd = stats.mean_sd(val_final)
    last_mean, last_sd = stats.mean_sd(intrain_last)
    return {
        "name": group.name, "optim": group.optim, "settings": group.settings,
        "runs": [str(r.dir) for r in group.runs],
        "train_seeds": [r.seed for r in group.runs],
        "n_seeds": len(group.runs),
        **over_runs(sample), f"{m}_per_seed": sample.rates(),
        f"best_{m}_mean": best_mean, f"best_{m}_sd": best_sd, "best_n_seeds": len(best_rates),
        "val_loss_mean": val_mean, "val_loss_sd": val_sd,
        "val_loss_best_mean": stats.mean_sd(val_best)[0],
        "intrain_last_n": last_n, "intrain_last_mean": last_mean, "intrain_last_sd": last_sd,
        "intrain_n_seeds": len(intrain_last),
        "intrain_max_mean": stats.mean_sd(intrain_max)[0],
    }


def _common_episodes(sample: Sample) -> tuple[list[int], list[list[float]]] | str:
    """The episode seeds every run of `sample` completed, and each run's values on them (in seed order); or why
    there are none to pair."""
    seeds = sample.episode_seeds()
    if any(s is None for s in seeds):
        return "a report has no per-episode results"
    common = sorted(set.intersection(*map(set, seeds)))
    if not common:
        return "runs played no episode seed in common"
    values = [dict(zip(s, v)) for s, v in zip(seeds, sample.values())]
    return common, [[run[e] for e in common] for run in values]


def no_difference(baseline_name: str | None) -> dict[str, Any]:
    """The difference fields of an entry without a baseline to compare with (the same keys as `difference`)."""
    return {"baseline_group": baseline_name, "diff_vs_baseline": None, "diff_ci": None, "diff_interval": None,
            "diff_ci_bootstrap": None, "few_seeds": None, "p_permutation": None, "p_permutation_min": None,
            "permutation": None, "p_paired": None, "p_paired_min": None, "paired": None}


def difference(baseline: Sample, group: Sample, n_boot: int, seed: int) -> dict[str, Any]:
    """The difference of means vs the baseline with its interval, and both tests (for the unperturbed eval and
    for each perturbation level alike).

    `diff_ci` is Welch's t interval on the per-seed means (`stats.seed_t_interval`; for success each group's
    variance at least a seed's binomial variance), the interval that holds at 2-5 training seeds;
    `diff_ci_bootstrap` the hierarchical percentile bootstrap (under-covers at 2-3 seeds; for reference). Each
    p comes with the smallest p the design allows (`*_min`), and `few_seeds` flags fewer than 5 training seeds in
    either group. The paired test is over the episode seeds every run of both groups completed (all of them,
    unless --allow-errors let errored episodes in)."""
    base_rates, group_rates = baseline.rates(), group.rates()
    interval = stats.difference_interval(baseline.values(), group.values(), binary=group.metric == "success")
    boot = stats.hierarchical_bootstrap_diff(baseline.values(), group.values(), n_boot=n_boot, seed=seed)
    perm = stats.permutation_test(base_rates, group_rates, seed=seed)
    out: dict[str, Any] = {
        **no_difference(baseline.name),
        "diff_vs_baseline": interval["diff"], "diff_ci": interval["ci"],
        "diff_interval": {k: interval[k] for k in ("method", "level", "se", "df")},
        "diff_ci_bootstrap": boot["ci"], "few_seeds": min(len(base_rates), len(group_rates)) < stats.FEW_SEEDS,
        "p_permutation": perm["p"], "p_permutation_min": perm["min_p"],
        "permutation": {k: perm[k] for k in ("method", "n_permutations", "seed", "min_p")}}
    both = _common_episodes(Sample(group.name, baseline.reports + group.reports, group.metric))
    if isinstance(both, str):
        out["paired"] = {"skipped": both}
    else:
        _, values = both
        paired = stats.paired_episode_test(values[:len(baseline.reports)], values[len(baseline.reports):],
                                           seed=seed)
        out["p_paired"], out["p_paired_min"] = paired["p"], paired["min_p"]
        out["paired"] = {k: paired[k] for k in ("n_episodes", "n_discordant", "mean_diff", "method", "min_p")}
    return out


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
            p = perturbation_of(report)
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
    zero = [r.eval for r in group.runs if not is_perturbed(r.eval)]
    return {kind: {0.0: zero, **levels} if zero else levels for kind, levels in sorted(cells.items())}


def perturbation_curves(levels: Levels, metric: str = "success") -> dict[str, list[dict[str, Any]]]:
    """The metric against perturbation level per kind (pooled with its interval, and mean ± sd over runs)."""
    return {kind: [{"level": level, "n_seeds": len(by_level[level]),
                    **over_runs(Sample("", by_level[level], metric))} for level in sorted(by_level)]
            for kind, by_level in levels.items()}


def perturbation_differences(name: str, curves: dict[str, list[dict[str, Any]]], levels: Levels,
                             base_name: str, base_levels: Levels, n_boot: int, seed: int,
                             metric: str = "success") -> dict[str, list[dict[str, Any]]]:
    """The curves' rows (copies) with the difference to the baseline group at the same kind and level: the group's
    reports at that level against the baseline's, by `difference` (level 0 gives the group's main numbers). A level
    the baseline has no report at gets None and a `note`."""
    out = {}
    for kind, rows in curves.items():
        out[kind] = []
        for row in rows:
            base_reports = base_levels.get(kind, {}).get(row["level"])
            if base_reports:
                diff = difference(Sample(base_name, base_reports, metric),
                                  Sample(name, levels[kind][row["level"]], metric), n_boot, seed)
                note = None
            else:
                diff = no_difference(base_name)
                note = f"baseline group {base_name} has no runs at {kind} {row['level']:g}"
            out[kind].append({**row, **diff, "note": note})
    return out


def select_best_config(groups: list[Group], summaries: dict[str, dict]) -> dict[tuple[str, int], Group]:
    """Per optimizer (and protocol), the grid point with the highest mean in-training score on the selection
    seeds (success, or mean return for a return metric; mean over training seeds of each run's last-N in-training
    evaluations); ties go to the first name in sorted order."""
    missing = [g.name for g in groups if summaries[g.name]["intrain_last_mean"] is None]
    if missing:
        raise UserError(f"--select best-config needs in-training rollouts (train.eval_every > 0) in metrics.jsonl; "
                        f"missing in group(s): {', '.join(missing)}")
    chosen: dict[tuple[str, int], Group] = {}
    for g in groups:
        best = chosen.get((g.optim, g.protocol))
        if best is None or summaries[g.name]["intrain_last_mean"] > summaries[best.name]["intrain_last_mean"]:
            chosen[(g.optim, g.protocol)] = g
    return chosen

