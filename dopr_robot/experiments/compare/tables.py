"""compare.md: the report's tables as markdown (aligned, so they read in a terminal too)."""

from __future__ import annotations

import json
from typing import Any

from dopr_robot import stats

# ---------------------------------------------------------------- tables

def _value(x: float | None, metric: str, digits: int = 1) -> str:
    """Success and normalized return as percentages, a return in its own units."""
    if x is None:
        return "-"
    return f"{x:.4g}" if metric == "return" else f"{100 * x:.{digits}f}%"


def _pm(mean: float | None, sd: float | None, metric: str | None = "success") -> str:
    """mean ± sd; metric None: a plain number (validation loss)."""
    if mean is None:
        return "-"
    if metric is None or metric == "return":
        return f"{mean:.4g}" + (f" ± {sd:.2g}" if sd is not None else "")
    return _value(mean, metric) + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _p(p: float | None, min_p: float | None = None) -> str:
    """A p-value with the smallest p its test could give here: "0.300 (min 0.100)"."""
    text = lambda x: f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"  # noqa: E731
    return "-" if p is None else text(p) + ("" if min_p is None else f" (min {text(min_p)})")


def _aligned(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns, so it reads in a terminal too."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _diff(e: dict[str, Any], metric: str) -> str:
    """The difference with its interval; "†" marks fewer than 5 training seeds in a group."""
    if e.get("diff_vs_baseline") is None:
        return "-"
    mark = " †" if e.get("few_seeds") else ""
    if metric == "return":
        number = lambda x: f"{x:+.4g}"  # noqa: E731
    else:
        number = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    unit = "" if metric == "return" else " pp"
    if e["diff_ci"] is None:
        return f"{number(e['diff_vs_baseline'])}{unit} [needs 2+ seeds per group]{mark}"
    lo, hi = e["diff_ci"]
    return f"{number(e['diff_vs_baseline'])}{unit} [{number(lo)}, {number(hi)}]{mark}"


def _pooled(e: dict[str, Any], metric: str) -> str:
    pooled, ci = e[f"{metric}_pooled"], e[f"{metric}_ci"]
    if ci is None:
        return _value(pooled, metric)
    scale = (lambda x: f"{x:.4g}") if metric == "return" else (lambda x: f"{100 * x:.1f}")  # noqa: E731
    return f"{_value(pooled, metric)} [{scale(ci[0])}, {scale(ci[1])}]"


def _has_baseline(e: dict[str, Any]) -> bool:
    return e.get("baseline_group") not in (None, e["name"])


def table(entries: list[dict[str, Any]], last_n: int, metric: str = "success", checkpoint: str = "final") -> str:
    """A markdown table (aligned, so it reads in a terminal too); `checkpoint`: whose report is the held-out one."""
    label = stats.METRIC_LABELS[metric]
    header = ["group", "seeds", "val loss (final)", "val loss (best)", f"{label} {checkpoint}",
              f"pooled [{stats.POOLED_INTERVAL[metric]}]", f"{label} best ckpt",
              f"in-train {'success' if metric == 'success' else 'return'} last {last_n}",
              "diff vs baseline [95% CI]", "p perm", "p paired"]
    rows = []
    for e in entries:
        diff = "baseline" if e.get("baseline_group") == e["name"] else _diff(e, metric)
        rows.append([e["name"], str(e["n_seeds"]), _pm(e["val_loss_mean"], e["val_loss_sd"], None),
                     "-" if e["val_loss_best_mean"] is None else f"{e['val_loss_best_mean']:.4g}",
                     _pm(e[f"{metric}_mean"], e[f"{metric}_sd"], metric), _pooled(e, metric),
                     _pm(e[f"best_{metric}_mean"], e[f"best_{metric}_sd"], metric),
                     _pm(e["intrain_last_mean"], e["intrain_last_sd"], "success" if metric == "success" else "return"),
                     diff,
                     _p(e.get("p_permutation"), e.get("p_permutation_min")),
                     _p(e.get("p_paired"), e.get("p_paired_min"))])
    return _aligned(header, rows)


def perturbation_tables(entries: list[dict[str, Any]], metric: str = "success") -> list[str]:
    """Per perturbation kind, a markdown table: one row per level; per group its pooled metric with its interval
    and, for a group with a baseline, its difference to it at that level with both p-values."""
    kinds = sorted({k for e in entries for k in e.get("perturbation") or {}})
    parts: list[str] = []
    for kind in kinds:
        present = [e for e in entries if (e.get("perturbation") or {}).get(kind)]
        by_level = [{r["level"]: r for r in e["perturbation"][kind]} for e in present]
        header = ["level"]
        for e in present:
            header.append(f"{e['name']} [{stats.POOLED_INTERVAL[metric]}]")
            if _has_baseline(e):
                header += [f"{e['name']} vs {e['baseline_group']} [95% CI]", "p perm", "p paired"]
        rows = []
        for level in sorted({lv for rows_of in by_level for lv in rows_of}):
            cells = [f"{level:g}"]
            for e, rows_of in zip(present, by_level):
                r = rows_of.get(level)
                cells.append("-" if r is None else _pooled(r, metric))
                if _has_baseline(e):
                    diff = "-" if r is None else ("no baseline runs" if r.get("note") else _diff(r, metric))
                    r = r or {}
                    cells += [diff, _p(r.get("p_permutation"), r.get("p_permutation_min")),
                              _p(r.get("p_paired"), r.get("p_paired_min"))]
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
                     str(s["trend"]["n_runs"]), stats.trend_label(s["trend"]),
                     _p(s["trend"]["p"], s["trend"].get("min_p"))])
    return _aligned(header, rows)


def format_markdown(report: dict[str, Any]) -> str:
    last_n = report["groups"][0]["intrain_last_n"]
    metric = report.get("metric", "success")
    label = stats.METRIC_LABELS[metric]
    boot = report["statistics"]["bootstrap"]
    parts = [f"# compare: baseline {report['baseline']}" + ("" if metric == "success" else f", metric {label}"), "",
             f"{label.capitalize()}: per episode on the held-out seeds ("
             + ("eval_best.json, the best checkpoint by selection rollouts" if report.get("checkpoint") == "best"
                else "eval.json, final checkpoint") + "), mean ± sd over "
             f"training seeds; pooled over all episodes [{stats.POOLED_INTERVAL[metric]} interval]. diff: mean "
             f"minus the baseline group's, with Welch's t 95% interval on the per-seed means"
             + (" (each group's variance at least a seed's binomial variance)" if metric == "success" else "")
             + f"; † marks fewer than {stats.FEW_SEEDS} training seeds in a group. p perm: permutation test over "
             "training seeds; p paired: sign-flip test over shared episode seeds; (min ...): the smallest p each "
             "test can give with these groups. The hierarchical bootstrap interval (B = "
             f"{boot['n_boot']}, seed {boot['seed']}; under-covers at 2-3 seeds) is diff_ci_bootstrap in "
             "compare.json.", "",
             "## Same configuration", "", table(report["groups"], last_n, metric, report.get("checkpoint", "final"))]
    trends = [(panel, s) for panel in report.get("grid", []) for s in panel["series"] if s.get("trend")]
    if trends:
        parts += ["", "## Trend over a swept setting", "",
                  f"Least-squares slope of per-seed held-out {label} on the setting (on log10 of it for a "
                  "log-spaced sweep: the change per decade), over every run of the curve; p perm: permutation test "
                  f"of the slope (runs' {label} reassigned across the setting values).", "",
                  trend_table(trends)]
    if any(g.get("perturbation") for g in report["groups"]):
        parts += ["", f"## {label.capitalize()} under perturbation", "",
                  "Per perturbation level (eval_<tag>.json of the final checkpoint; level 0 is eval.json): pooled "
                  f"{label} [{stats.POOLED_INTERVAL[metric]}], and the difference to the baseline group's runs at "
                  "the same kind and level with the same interval and tests as above (level 0 repeats the main "
                  "difference)."]
        parts += perturbation_tables(report["groups"], metric)
    if "best_config" in report:
        parts += ["", "## Best configuration per optimizer", "", report["best_config"]["criterion"] + ".", "",
                  table(report["best_config"]["groups"], last_n, metric, report.get("checkpoint", "final"))]
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

