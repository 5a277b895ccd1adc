"""`python -m dopr_robot.experiments.child PARENT_PID ARGS...`: the dopr-robot CLI as a child that dies with its sweep;
`... PARENT_PID --cell-reports CELL_JOB_JSON`: every missing eval report of a sweep cell, in one worker pool
(`cells.evaluate_reports`).

A sweep killed with SIGKILL cannot stop its children: this one dies with it (`parent_death`), so a re-run of the
sweep never finds an orphan still training the cell it wants to resume.
"""

from __future__ import annotations

import sys

from dopr_robot.parent_death import die_with_parent


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(parent)
    if args[:1] == ["--cell-reports"]:
        from dopr_robot.experiments.cells import CellJob, evaluate_reports

        sys.exit(evaluate_reports(CellJob.from_json(args[1])))
    sys.argv = ["dopr-robot", *args]
    from dopr_robot.cli import run

    run()


if __name__ == "__main__":
    main()
