"""drift.png: the drift curve (all / successful / failed episodes) over the demos' own nearest-neighbour band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display (headless machines, Docker)
import matplotlib.pyplot as plt  # noqa: E402

from dopr_robot.fileio import atomic_path  # noqa: E402


def plot_drift(report: dict[str, Any], path: str | Path) -> None:
    """Write the figure atomically to `path` (PNG)."""
    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    band = report.get("demo_band")
    if band:
        ax.axhspan(band[0], band[1], color="0.5", alpha=0.2, linewidth=0, label=f"demos' own nn distance ({band[0]:.3g}-{band[1]:.3g}, "
                                                             f"p{report['demo_band_percentiles'][0]:g}-"
                                                             f"p{report['demo_band_percentiles'][1]:g})")
    curves = [("drift_mean", f"all episodes ({report['n_success'] + report['n_failure']})", "black", "-"),
              ("drift_success", f"successful ({report['n_success']})", "tab:green", "--"),
              ("drift_failure", f"failed ({report['n_failure']})", "tab:red", "--")]
    for key, label, color, style in curves:
        values = [float("nan") if v is None else v for v in report[key]]
        if any(v is not None for v in report[key]):
            ax.plot(steps, values, style, color=color, label=label, linewidth=1.5)
    if report.get("departure_step") is not None:
        ax.axvline(report["departure_step"], color="tab:blue", linestyle=":",
                   label=f"departure step {report['departure_step']}")
    running = report.get("episodes_running")
    if running:  # late steps average few episodes: show how many
        count_ax = ax.twinx()
        count_ax.step(steps, running, where="post", color="0.55", linewidth=0.8)
        ax.set_zorder(count_ax.get_zorder() + 1)  # curves and legend above the count line
        ax.patch.set_visible(False)
        ax.plot([], [], color="0.55", linewidth=0.8, label="episodes still running (right axis)")
        count_ax.set_ylabel("episodes still running", color="0.45", fontsize=8)
        count_ax.set_ylim(0, max(running) * 1.05)
        count_ax.tick_params(axis="y", colors="0.45", labelsize=8)
    ax.set_xlabel("time step of the episode")
    ax.set_ylabel("distance to nearest training-demo observation\n(normalized policy input)")
    mse = report.get("open_loop_chunk_mse")
    mse_text = "n/a (no valid demos)" if mse is None else f"{mse:.4f}"
    ax.set_title(f"closed-loop success {report['closed_loop_success']:.0%}, open-loop chunk MSE {mse_text}, "
                 f"KL(rollouts||demos) {report['kl_gaussian']:.3g}", fontsize=9)
    ax.set_xlim(0, max(1, len(steps) - 1))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
