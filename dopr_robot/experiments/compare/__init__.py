"""`dopr-robot compare`: group finished runs by optimizer and grid point, and test their success differences.

Inputs are run directories (RUN/config.yaml, metrics.jsonl, eval.json, eval_best.json, eval_<tag>.json,
drift.json) or sweep directories (DIR/sweep.json listing its cells; a directory of run directories works too).
A group is one optimizer at one grid point; its runs are its training seeds. Settings come from sweep.json when
present, else from the keys in which the runs' config.yaml differ (bookkeeping keys such as the seed, the device
and the `eval` section excluded; `optim.ap.*` dropped for optimizers without AP).

Per group, success is the mean over training seeds of each run's held-out success rate (eval.json, the final
checkpoint); the differences to the baseline group come with a hierarchical bootstrap interval, an exact
permutation test over training seeds and, when every run played the same episode seeds, an exact paired
sign-flip test over episode seeds (see `dopr_robot.stats`). Perturbed reports (eval_<tag>.json) give
success per perturbation kind and level, each level compared with the baseline group's runs at the same kind and
level by the same `difference` (level 0 is eval.json). A run without eval.json is listed as incomplete and left
out of the statistics, never an error. Where a numeric setting varies within an optimizer,
`grid` holds success against it (plot (e); see `grid_panels`).

Modules: `runs` (finding runs and checking their reports), `groups` (grouping, baselines), `analysis` (statistics
of groups), `trends` (success against a swept setting), `report` (compare.json's content), `tables` (compare.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from dopr_robot.errors import UserError
from dopr_robot.experiments.compare.groups import make_groups
from dopr_robot.experiments.compare.report import build_report
from dopr_robot.experiments.compare.runs import discover
from dopr_robot.experiments.compare.tables import format_markdown
from dopr_robot.fileio import write_json, write_text
from dopr_robot.provenance import provenance

__all__ = ["build_report", "compare", "default_out", "discover", "format_markdown"]

# ---------------------------------------------------------------- the command

def default_out(paths: Sequence[Path]) -> Path:
    if len(paths) == 1:
        return Path(paths[0]) / "compare"
    raise UserError("several inputs: pass --out DIR for compare's outputs")


def compare(paths: Sequence[Path], baseline: str | None = None, select: str = "same-config",
            out: Path | None = None, last_n: int = 5, n_boot: int = 10_000, seed: int = 0,
            command: Sequence[str] | None = None, allow_errors: bool = False,
            split_protocols: bool = False, metric: str = "success",
            checkpoint: str = "final") -> tuple[dict[str, Any], list[str]]:
    """Read the runs, compute the report, write OUT/compare.json, compare.md and the plots.
    Returns (report, warnings). Reports with errored episodes are refused unless `allow_errors`; runs of
    different protocols unless `split_protocols`. `metric`: success, return or normalized_return per episode.
    `checkpoint`: each run's held-out report is of its final checkpoint (eval.json) or its best (eval_best.json)."""
    from dopr_robot import plotting

    out = Path(out) if out is not None else default_out(paths)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    warnings: list[str] = []
    runs, sweeps = discover(paths, warnings, metric=metric, allow_errors=allow_errors, checkpoint=checkpoint)
    report = build_report(runs, baseline, select, last_n, n_boot, seed, split_protocols=split_protocols,
                          metric=metric)
    report["allow_errors"] = allow_errors
    report["checkpoint"] = checkpoint
    for run in runs:
        if not run.complete:
            warnings.append(f"{run.dir}: incomplete ({'; '.join(run.problems)}), left out")
    report["inputs"] = {"paths": [str(p) for p in paths], "sweeps": sweeps}
    report["provenance"] = provenance(command=command if command is not None else sys.argv)
    groups = make_groups(runs, metric)
    report["plots"], plot_notes = plotting.compare_plots(groups, report, out)
    report["notes"] += plot_notes
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", report)
    write_text(out / "compare.md", format_markdown(report))
    return report, warnings
