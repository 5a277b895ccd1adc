"""compare.md: the report's tables as markdown (aligned, so they read in a terminal too)."""

from __future__ import annotations

import json
from typing import Any

from dopr_robot import stats

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
    if report.get("errored_episodes"):
        parts += ["", "## Errored episodes (--allow-errors)", "",
                  "Episodes that raised or timed out are missing, not failures: these reports' rates are over their "
                  "completed episodes, and paired tests over the episode seeds every run completed.", ""]
        parts += [f"- {e['report']}: {e['n_errors']} of {e['episodes']} episodes errored ({e['n_completed']} "
                  f"completed)" for e in report["errored_episodes"]]
    if len(report.get("protocols") or []) > 1:
        parts += ["", "## Protocols (--split-protocols: each compared apart)", ""]
        parts += [f"- p{p['index']} ({p['runs']} runs): "
                  + ", ".join(f"{k} {json.dumps(p['fields'][k])}" for k in p["differs_in"])
                  for p in report["protocols"]]
    if report["incomplete"]:
        parts += ["", "## Incomplete runs (left out)", ""]
        parts += [f"- {i['run']}: {i['reason']}" for i in report["incomplete"]]
    if report["notes"]:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(parts) + "\n"

