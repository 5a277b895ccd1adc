"""Plots of one run (training curves) and of a comparison (`compare`), as PNG files.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no GUI backend, no global state),
and written atomically. A curve over training seeds is drawn as the mean over the seeds that have a value at
that step with a band from the smallest to the largest seed (`mean_band`), the same code for one run and for
a group of runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dopr_robot.errors import UserError
from dopr_robot import stats
from dopr_robot.fileio import atomic_path
from dopr_robot.rundir import check_output_file, read_metrics

DPI = 110
AXIS_LABELS = {"action_noise": "action noise (std, env action units)",
               "obs_noise": "observation noise (std, normalized units)",
               "push": "push probability per episode"}
NOTE_STYLE = {"ha": "center", "va": "center", "fontsize": 9, "color": "0.4", "wrap": True}


def _metric_axis(ax, metric: str) -> None:
    """Success is a rate: its axis spans 0-1; returns take the data's range."""
    if metric == "success":
        ax.set_ylim(-0.03, 1.03)


def new_figure(rows: int, cols: int, width: float = 4.4, height: float = 3.2):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG at `path` atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def group_colors(names: Sequence[str]) -> dict[str, Any]:
    """One fixed color per group name, the same in every plot of a comparison."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, **NOTE_STYLE)
    ax.set_xticks([])
    ax.set_yticks([])


def log_y(ax) -> None:
    """Log scale with plain tick labels (0.3, 1.2) instead of 3 x 10^-1; minor ticks are labelled only when the
    data span less than a decade (else there are major ticks enough). Call after plotting the data."""
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()

    def minor(v: float, _) -> str:  # a narrow range: every minor tick; up to two decades: 2x and 5x only
        mantissa = v / 10 ** math.floor(math.log10(v))
        return f"{v:.3g}" if hi < 10 * lo or min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor) if hi < 100 * lo else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_band(ax, curves: Sequence[tuple[Sequence[float], Sequence[float]]], color=None, label: str | None = None,
              linestyle: str = "-") -> bool:
    """Plot the mean over curves (x, y) at each x, with a min-max band where two or more curves have a value.
    Non-finite values are left out. Returns whether anything was drawn."""
    xs = sorted({float(x) for cx, cy in curves for x, y in zip(cx, cy) if _finite(y)})
    if not xs:
        return False
    index = {x: i for i, x in enumerate(xs)}
    grid = np.full((len(curves), len(xs)), np.nan)
    for row, (cx, cy) in enumerate(curves):
        for x, y in zip(cx, cy):
            if _finite(y):
                grid[row, index[float(x)]] = y
    counts = np.sum(~np.isnan(grid), axis=0)
    mean = np.nansum(grid, axis=0) / counts
    marker = "o" if len(xs) <= 12 else None
    ax.plot(xs, mean, color=color, label=label, linestyle=linestyle, marker=marker, markersize=3)
    if len(curves) > 1:
        banded = counts >= 2
        lo = np.where(banded, np.nanmin(np.where(np.isnan(grid), np.inf, grid), axis=0), np.nan)
        hi = np.where(banded, np.nanmax(np.where(np.isnan(grid), -np.inf, grid), axis=0), np.nan)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.18, linewidth=0)
    return True


# ---------------------------------------------------------------- one run

def unmeasured_layers_note(records: list[dict[str, Any]]) -> str | None:
    """The health panel's note on the AP layers it has no curve for: DoPr measures cond(S_d) only on layers that
    took the primal path (the only one that factorizes S_d); the dual and backward paths never form it. Counts
    from the last record with path counts (`ap_layers_<path>`); None when every AP layer took the primal path."""
    last = next((r for r in reversed(records) if any(k.startswith("ap_layers_") for k in r)), None)
    if last is None:
        return None
    counts = {path: int(last.get(f"ap_layers_{path}") or 0) for path in ("dual", "backward")}
    if not sum(counts.values()):
        return None
    which = ", ".join(f"{n} AP layer{'s' if n > 1 else ''} on the {path} path" for path, n in counts.items() if n)
    return (f"not shown: {which}\n(those paths never form S_d);\n"
            f"`dopr-robot spectrum RUN` gives every layer's cond(S_d)")


def training_curves(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Loss and validation loss, learning rate, step time, gradient norm, DoPr health and in-training success
    of one run's metrics.jsonl records, as one PNG."""
    if not records:
        raise UserError(f"no metrics records to plot for {path}")
    fig, axes = new_figure(2, 3)
    step = lambda key: [(r["step"], r[key]) for r in records if _finite(r.get(key))]  # noqa: E731

    def series(ax, key: str, label: str, **style) -> bool:
        points = step(key)
        if points:
            xs, ys = zip(*points)
            return mean_band(ax, [(xs, ys)], label=label, **style)
        return False

    ax = axes[0, 0]
    drawn = series(ax, "loss", "train loss", color="C0")
    drawn |= series(ax, "val_loss", "validation loss (EMA)", color="C1")
    if drawn:
        log_y(ax)
        ax.legend(fontsize=8)
        ax.set_title("loss")
    ax = axes[0, 1]
    series(ax, "lr", "lr", color="C2") and ax.set_title("learning rate")
    ax = axes[0, 2]
    if series(ax, "step_time_s", "s/step", color="C3"):
        ax.set_title("step time (s, mean over the log window)")
    ax = axes[1, 0]
    if series(ax, "grad_norm", "grad norm", color="C4"):
        log_y(ax)
        ax.set_title("gradient norm (before clipping)")

    ax = axes[1, 1]
    cond_keys = sorted({k for r in records for k in r if k.startswith("ap_cond/")})
    if cond_keys:
        if len(cond_keys) <= 6:
            for i, key in enumerate(cond_keys):
                series(ax, key, key.split("/", 1)[1], color=f"C{i}")
        else:  # many layers: the spread over layers at each step (median line, min-max band)
            per_step = [(r["step"], [r[k] for k in cond_keys if _finite(r.get(k))]) for r in records]
            per_step = [(s, v) for s, v in per_step if v]
            xs = [s for s, _ in per_step]
            ax.plot(xs, [np.median(v) for _, v in per_step], color="C0", marker="o", markersize=3,
                    label=f"median of {len(cond_keys)} layers")
            ax.fill_between(xs, [min(v) for _, v in per_step], [max(v) for _, v in per_step], color="C0",
                            alpha=0.18, linewidth=0, label="min-max over layers")
        log_y(ax)
    handles, labels = ax.get_legend_handles_labels()
    fallbacks = step("ap_fallbacks")
    if fallbacks:
        twin = ax.twinx()
        xs, ys = zip(*fallbacks)
        twin.step(xs, ys, where="post", color="0.3", linestyle=":", label="Cholesky fallbacks (right axis)")
        twin.set_ylabel("fallbacks (cumulative)", fontsize=8)
        twin.set_ylim(bottom=0, top=max(1, max(ys)) * 1.1)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper left")
    unmeasured = unmeasured_layers_note(records)
    if cond_keys or fallbacks:
        ax.set_title("DoPr: condition number of damped S per layer")
        if unmeasured:  # in the middle of an empty panel, else below the curves
            where = dict(x=0.02, y=0.04, ha="left", va="bottom") if cond_keys else dict(x=0.5, y=0.5, ha="center",
                                                                                      va="center")
            ax.text(s=unmeasured, transform=ax.transAxes, fontsize=7, color="0.3", **where)
    else:
        _note(ax, unmeasured or "no DoPr health keys in metrics.jsonl\n(AdamW and Muon report none)")

    ax = axes[1, 2]
    if series(ax, "success", "in-training success (selection seeds)", color="C5"):
        ax.set_ylim(-0.03, 1.03)
        ax.set_title("in-training success (selection seeds)")
    else:
        _note(ax, "no in-training success\n(train.eval_every = 0)")
    for ax in axes.flat:
        if ax.has_data():
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def plot_run(run_dir: str | Path, out: str | Path | None = None, missing_ok: bool = False) -> Path | None:
    """Write RUN/training_curves.png (or `out`) from RUN/metrics.jsonl. With `missing_ok`, a run without records
    returns None instead of raising (the end of a `train --until` slice shorter than one log window)."""
    import yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        if missing_ok:
            return None
        raise UserError(f"{run_dir / 'metrics.jsonl'}: missing or without records, nothing to plot")
    what = "--out" if out else "plot file"
    out = Path(out) if out else run_dir / "training_curves.png"
    check_output_file(out, overwrite=True, suffixes=(".png",), what=what)  # before any drawing
    title = run_dir.name
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        title += f"  ({cfg['policy']['type']} / {cfg['policy']['backbone']}, {cfg['optim']['name']}, " \
                 f"seed {cfg['train']['seed']})"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    return training_curves(records, out, title)


# ---------------------------------------------------------------- a comparison

def success_vs_val_loss(points: dict[str, list[tuple[float, float]]], colors: dict, path: Path,
                        metric: str = "success") -> Path:
    """(a) One point per run: held-out success (or the compared metric) against final validation loss, colored by
    group. If validation loss predicted success the points would line up; test-time feedback is the scatter around
    that line."""
    fig, axes = new_figure(1, 1, width=6.4, height=4.4)
    ax = axes[0, 0]
    for name, pts in points.items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, color=colors[name], label=f"{name} (n={len(pts)})", s=28, alpha=0.85)
        ax.scatter([np.mean(xs)], [np.mean(ys)], color=colors[name], marker="X", s=90, edgecolor="k", linewidth=0.6)
    ax.set_xlabel("final validation loss (EMA policy)")
    ax.set_ylabel(f"{stats.METRIC_LABELS[metric]}, held-out seeds")
    _metric_axis(ax, metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="one dot per run; X = group mean", title_fontsize=8)
    ax.set_title(f"closed-loop {stats.METRIC_LABELS[metric]} vs validation loss")
    return save_png(fig, path)


def group_training_curves(curves: dict[str, list[list[dict]]], colors: dict, path: Path) -> Path:
    """(b) In-training success and validation loss over steps per group (mean, min-max band over seeds)."""
    fig, axes = new_figure(1, 2)
    for ax, key, title in ((axes[0, 0], "success", "in-training success (selection seeds)"),
                           (axes[0, 1], "val_loss", "validation loss (EMA policy)")):
        drawn = False
        for name, runs in curves.items():
            run_curves = [([r["step"] for r in recs if _finite(r.get(key))],
                           [r[key] for r in recs if _finite(r.get(key))]) for recs in runs]
            run_curves = [c for c in run_curves if c[0]]
            if run_curves:
                drawn |= mean_band(ax, run_curves, color=colors[name], label=f"{name} (n={len(run_curves)})")
        if drawn:
            ax.set_title(title + "\nmean over seeds, band min-max", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if key == "success":
                ax.set_ylim(-0.03, 1.03)
            else:
                log_y(ax)
        else:
            _note(ax, f"no {key} in metrics.jsonl" + ("\n(train.eval_every = 0)" if key == "success" else ""))
    return save_png(fig, path)


def _nan(values: Sequence[Any]) -> list[float]:
    return [float(v) if _finite(v) else math.nan for v in values]


def drift_curves(drifts: dict[str, list[dict]], colors: dict, path: Path) -> Path:
    """(c) Distance of rollout observations to the nearest demo observation per time step (RUN/drift.json):
    all episodes (left), successes solid and failures dashed (right), with the demos' own band."""
    fig, axes = new_figure(1, 2)
    band = None
    for name, reports in drifts.items():
        curves = [(d["steps"], _nan(d["drift_mean"])) for d in reports]
        mean_band(axes[0, 0], curves, color=colors[name], label=f"{name} (n={len(reports)})")
        departures = [d["departure_step"] for d in reports if _finite(d.get("departure_step"))]
        if departures:
            axes[0, 0].axvline(float(np.mean(departures)), color=colors[name], linestyle=":", linewidth=1)
        for key, style in (("drift_success", "-"), ("drift_failure", "--")):
            sub = [(d["steps"], _nan(d.get(key) or [])) for d in reports if d.get(key)]
            if sub:
                mean_band(axes[0, 1], sub, color=colors[name], linestyle=style,
                          label=f"{name} {key.split('_')[1]}")
        band = band or next((d["demo_band"] for d in reports if d.get("demo_band")), None)
    for ax in axes.flat:
        if band:
            ax.axhspan(band[0], band[1], color="0.5", alpha=0.15, label="demos' own NN band")
        ax.set_xlabel("time step")
        ax.set_ylabel("distance to nearest demo obs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title("drift, all episodes (dotted: mean departure step)", fontsize=10)
    axes[0, 1].set_title("drift, successes (solid) vs failures (dashed)", fontsize=10)
    return save_png(fig, path)


def perturbation_curves(groups: list[dict], colors: dict, path: Path, metric: str = "success") -> Path:
    """(d) Success (or the compared metric) against perturbation level per group, one panel per kind (pooled,
    Wilson 95% bars for success, t intervals over episodes for returns)."""
    kinds = sorted({k for g in groups for k in (g.get("perturbation") or {})})
    fig, axes = new_figure(1, len(kinds))
    for ax, kind in zip(axes[0], kinds):
        levels = [r["level"] for g in groups for r in (g.get("perturbation") or {}).get(kind, [])]
        dodge = 0.012 * (max(levels) - min(levels) or 1.0)  # groups side by side, so error bars do not overlap
        for i, g in enumerate(groups):
            rows = (g.get("perturbation") or {}).get(kind)
            if not rows:
                continue
            x = [r["level"] + (i - (len(groups) - 1) / 2) * dodge for r in rows]
            y = [r[f"{metric}_pooled"] for r in rows]
            err = [[yi - r[f"{metric}_ci"][0] for yi, r in zip(y, rows)], [r[f"{metric}_ci"][1] - yi
                                                                           for yi, r in zip(y, rows)]]
            ax.errorbar(x, y, yerr=err, color=colors[g["name"]], marker="o", markersize=4, capsize=3,
                        label=g["name"])
        ax.set_xlabel(AXIS_LABELS.get(kind.split(" ", 1)[0], kind) + kind[len(kind.split(" ", 1)[0]):])
        ax.set_ylabel(f"{stats.METRIC_LABELS[metric]} (pooled, {stats.POOLED_INTERVAL[metric]})")
        _metric_axis(ax, metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{stats.METRIC_LABELS[metric]} under {kind}", fontsize=10)
    return save_png(fig, path)


def _value(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if metric == "return" else f"{100 * x:.0f}%"


def grid_curves(panels: list[dict], colors: dict, path: Path, metric: str = "success") -> Path:
    """(e) Held-out success against a numeric setting swept within an optimizer, one panel per setting key
    (`compare.grid_panels`). Per series (an optimizer, at fixed other settings): pooled success with Wilson 95%
    bars (dots) and the mean over training seeds (open diamonds), each point labelled with its number of training
    seeds; a value marked "(config)" is where a group without the setting sits (its runs' config.yaml). Groups
    without the setting are dashed horizontal lines with their Wilson band, the baseline bolder. The colors are
    this plot's own (a series spans several groups), not `colors`."""
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(rows, cols, width=6.6, height=4.6)
    for ax, panel in zip(axes.flat, panels):
        key, series, lines = panel["key"], panel["series"], panel["lines"]
        series_labels = set()
        palette = iter(colormaps["tab10" if len(series) + len(lines) <= 10 else "tab20"].colors)
        xs = sorted({p["x"] for s in series for p in s["points"]})
        lo, hi = xs[0], xs[-1]
        for i, s in enumerate(series):  # side by side at a shared value, so that error bars do not overlap
            # (a panel has a series with two distinct values: lo < hi, and lo > 0 on a log axis)
            shift = (i - (len(series) - 1) / 2) * 0.015
            color = next(palette)
            pts = s["points"]
            x = [p["x"] * (hi / lo) ** shift if panel["log_x"] else p["x"] + shift * (hi - lo) for p in pts]
            y = [p[f"{metric}_pooled"] for p in pts]
            err = [[yi - p[f"{metric}_ci"][0] for yi, p in zip(y, pts)],
                   [p[f"{metric}_ci"][1] - yi for yi, p in zip(y, pts)]]
            fixed = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(s["fixed"].items()))
            label = s["optim"] + (f" ({fixed})" if fixed else "")
            if s.get("trend"):
                label += f"; trend {stats.trend_label(s['trend'])}, p {s['trend']['p']:.2g}"
            series_labels.add(label)
            ax.errorbar(x, y, yerr=err, color=color, marker="o", markersize=5, capsize=3, linewidth=1.6, label=label)
            ax.scatter(x, [p[f"{metric}_mean"] for p in pts], marker="D", s=34, facecolor="none", edgecolor=color,
                       linewidth=1.1, zorder=3)
            left = shift < 0  # the seed counts on the outer side of dodged series
            for xi, yi, p in zip(x, y, pts):
                ax.annotate(f"n={p['n_seeds']}", (xi, yi), xytext=(-7 if left else 7, 0), textcoords="offset points",
                            fontsize=7, color=color, va="center", ha="right" if left else "left",
                            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                  "alpha": 0.8})
        for j, line in enumerate(lines):
            color = next(palette)
            bold = line["baseline"]
            pooled, (lo, hi) = line[f"{metric}_pooled"], line[f"{metric}_ci"]
            ax.axhspan(lo, hi, color=color, alpha=0.16 if bold else 0.09, linewidth=0)
            ax.axhline(pooled, color=color, linestyle=("--", "-.", ":")[j % 3],
                       linewidth=2.4 if bold else 1.2,
                       label=f"{line['group']}{' (baseline)' if bold else ''}: {_value(pooled, metric)} "
                             f"[{_value(lo, metric)}, {_value(hi, metric)}], "
                             f"n={line['n_seeds']}")
        if panel["log_x"]:
            ax.set_xscale("log")
            ax.set_xlim(lo / (hi / lo) ** 0.12, hi * (hi / lo) ** 0.12)
        else:
            pad = 0.08 * (hi - lo)
            ax.set_xlim(lo - pad, hi + pad)
        from_config = {p["x"] for s in series for p in s["points"] if p["from"] == "config"}
        ax.set_xticks(xs, [f"{x:g}" + ("\n(config)" if x in from_config else "") for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key + (" (log scale)" if panel["log_x"] else ""))
        ax.set_ylabel(f"{stats.METRIC_LABELS[metric]}, held-out seeds")
        _metric_axis(ax, metric)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: labels[i] not in series_labels)  # curves first
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=7, loc="best",
                  title=f"dot: pooled [{stats.POOLED_INTERVAL[metric]}]; diamond: mean over seeds; n: training seeds",
                  title_fontsize=7)
        ax.set_title(f"{stats.METRIC_LABELS[metric]} vs {key.rsplit('.', 1)[-1]}", fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return save_png(fig, path)


def compare_plots(groups: list, report: dict[str, Any], out: Path) -> tuple[dict[str, str | None], list[str]]:
    """Write compare's plots (a)-(e) into `out`; returns ({plot: path or None}, notes on plots left out)."""
    out.mkdir(parents=True, exist_ok=True)
    colors = group_colors([g.name for g in groups])
    plots: dict[str, str | None] = {}
    notes: list[str] = []

    points = {g.name: [(r.val_losses()[-1], rate) for r, rate in zip(g.runs, g.sample().rates()) if r.val_losses()]
              for g in groups}
    curves = {g.name: [r.metrics for r in g.runs if r.metrics] for g in groups}
    drifts = {g.name: [r.drift for r in g.runs if _valid_drift(r.drift)] for g in groups}
    drifts = {k: v for k, v in drifts.items() if v}
    perturbed = [g for g in report["groups"] if g.get("perturbation")]
    metric = report.get("metric", "success")
    plans = [  # (plot, its data, how to draw it, why it is left out when there is no data)
        ("success_vs_val_loss", points if any(points.values()) else None, success_vs_val_loss,
         "plot (a) left out: no run has a validation loss (no `valid` demos?)"),
        ("training_curves", curves if any(curves.values()) else None, group_training_curves,
         "plot (b) left out: no metrics.jsonl in any run"),
        ("drift", drifts or None, drift_curves,
         "plot (c) left out: no RUN/drift.json (run `dopr-robot diagnose RUN` first)"),
        ("perturbation", perturbed or None, perturbation_curves,
         "plot (d) left out: no perturbed eval reports (eval_<tag>.json with a perturbation)"),
        ("grid", report.get("grid") or None, grid_curves,
         "plot (e) left out: no numeric grid setting varies within an optimizer"),
    ]
    for name, data, draw, missing in plans:
        if data is None:
            plots[name] = None
            notes.append(missing)
        else:
            extra = {} if draw is group_training_curves or draw is drift_curves else {"metric": metric}
            plots[name] = str(draw(data, colors, out / f"{name}.png", **extra))
    return plots, notes


def _valid_drift(drift: dict | None) -> bool:
    return bool(drift) and isinstance(drift.get("steps"), list) and isinstance(drift.get("drift_mean"), list) \
        and len(drift["steps"]) == len(drift["drift_mean"]) > 0
