"""`python -m dopr_robot.experiments.child PARENT_PID ARGS...`: the dopr-robot CLI as a child that dies with its sweep;
`... PARENT_PID --cell-reports CELL_JOB_JSON`: every missing eval report of a sweep cell, in one worker pool
(`cells.evaluate_reports`).

A sweep killed with SIGKILL cannot stop its children. On Linux, PR_SET_PDEATHSIG asks the kernel to kill this
process when the thread that started it ends, so a re-run of the sweep never finds an orphan still training the cell
it wants to resume. Elsewhere this is exactly `python -m dopr_robot.cli ARGS...`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, args = int(sys.argv[1]), sys.argv[2:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os._exit(137)
    if args[:1] == ["--cell-reports"]:
        from dopr_robot.experiments.cells import CellJob, evaluate_reports

        sys.exit(evaluate_reports(CellJob.from_json(args[1])))
    sys.argv = ["dopr-robot", *args]
    from dopr_robot.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
