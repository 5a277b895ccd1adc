"""Recompute the difference intervals of committed compare.json files with compare's current interval.

    .venv/bin/python scripts/recompute_intervals.py docs/results/*/compare*.json [--baseline GROUP]

compare.json keeps, per group, each training seed's held-out success rate (`success_per_seed`) and the episodes
per run; per perturbation level it keeps the mean and sd over seeds. That is all Welch's t interval needs
(`dopr_robot.stats.welch_interval`, with each group's variance at least a seed's binomial variance, as
`compare` now computes it), so the README's Results can be recomputed without the run directories. For every
group with a baseline (the file's own, or --baseline: a group name of the file) it prints the difference, the
old interval stored in the file (hierarchical percentile bootstrap) and the new one, the exact permutation p
over training seeds with the smallest p those group sizes allow, and † where a group has fewer than 5 seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dopr_robot import stats


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}"


def _interval(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{_pp(ci[0])}, {_pp(ci[1])}]"


def moments(mean: float, sd: float | None, n: int) -> tuple[float, float, int]:
    return mean, (sd or 0.0) ** 2, n


def new_interval(base: dict, group: dict, episodes_per_run: tuple[float, float]) -> dict:
    """The interval compare computes now, from a group's (or a perturbation row's) mean, sd and seeds."""
    floors = tuple(stats.binomial_variance_floor([e["success_mean"]], [n])
                   for e, n in zip((base, group), episodes_per_run))
    return stats.welch_interval(moments(base["success_mean"], base["success_sd"], base["n_seeds"]),
                                moments(group["success_mean"], group["success_sd"], group["n_seeds"]),
                                variance_floor=floors)


def rows_of(report: dict, baseline: str | None) -> list[list[str]]:
    groups = {g["name"]: g for g in report["groups"]}
    rows = []
    for g in report["groups"]:
        base = groups.get(baseline or g.get("baseline_group") or "")
        if base is None or base is g:
            continue
        per_run = (base["episodes"] / base["n_seeds"], g["episodes"] / g["n_seeds"])
        perm = stats.permutation_test(base["success_per_seed"], g["success_per_seed"])
        stored = g.get("diff_ci") if base["name"] == g.get("baseline_group") else None
        new = new_interval(base, g, per_run)
        few = " †" if min(base["n_seeds"], g["n_seeds"]) < stats.FEW_SEEDS else ""
        rows.append([f"{g['name']} vs {base['name']}", f"{base['n_seeds']} v {g['n_seeds']}",
                     _pp(new["diff"]), _interval(stored), _interval(new["ci"]) + few,
                     f"{perm['p']:.3g} (min {perm['min_p']:.3g})"])
        base_levels = base.get("perturbation") or {}
        for kind, levels in (g.get("perturbation") or {}).items():
            by_level = {r["level"]: r for r in base_levels.get(kind, [])}
            for row in levels:
                if row["level"] == 0.0 or row["level"] not in by_level:
                    continue
                b = by_level[row["level"]]
                new = new_interval(b, row, per_run)
                stored = row.get("diff_ci") if base["name"] == g.get("baseline_group") else None
                rows.append([f"  {kind} {row['level']:g}", f"{b['n_seeds']} v {row['n_seeds']}",
                             _pp(new["diff"]), _interval(stored), _interval(new["ci"]) + few,
                             "-" if row.get("p_permutation") is None else f"{row['p_permutation']:.3g}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--baseline", help="compare every group with this group of the file instead")
    args = parser.parse_args()
    header = ["comparison", "seeds", "diff (pp)", "old: bootstrap", "new: Welch t", "p perm (min)"]
    for path in args.files:
        report = json.loads(path.read_text())
        rows = rows_of(report, args.baseline)
        print(f"\n{path}" + (f" (baseline {args.baseline})" if args.baseline else ""))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for cells in [header, ["-" * w for w in widths], *rows]:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")
    print(f"\n† fewer than {stats.FEW_SEEDS} training seeds in a group; new: Welch's t interval on per-seed success "
          f"rates, each group's variance at least q(1-q)/episodes")


if __name__ == "__main__":
    main()
