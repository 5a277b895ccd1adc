"""Fan sweep cells out: local threads (each cell's work runs in its own subprocesses), Ray, or submitit (SLURM
arrays; its local executor where there is no SLURM). The same `run_cell` runs everywhere; no scheduler of our own.

Every launcher calls `on_done(job, result)` in the driver process as each cell finishes, in completion order.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any, Callable, Optional

from dopr_robot.errors import UserError
from dopr_robot.experiments.cells import CellJob, run_cell, terminate_running

LAUNCHERS = ("local", "ray", "submitit")
OnDone = Callable[[CellJob, dict[str, Any]], None]


def launch(launcher: str, jobs: list[CellJob], parallel: int, options: dict[str, Any], sweep_dir: Path,
           on_state: Optional[Callable[[str, str], None]], on_done: OnDone) -> None:
    if not jobs:
        return
    if launcher == "local":
        _local(jobs, parallel, on_state, on_done)
    elif launcher == "submitit":
        _submitit(jobs, parallel, options, sweep_dir, on_done)
    elif launcher == "ray":
        _ray(jobs, options, on_done)
    else:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")


def check_available(launcher: str) -> None:
    """Fail before any work when the launcher's optional dependency is missing."""
    extra = {"ray": ("ray", "ray"), "submitit": ("submitit", "slurm")}.get(launcher)
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {launcher!r}")
    if extra:
        import importlib.util

        if importlib.util.find_spec(extra[0]) is None:
            raise UserError(f"--launcher {launcher} needs {extra[0]}: pip install 'dopr-robot[{extra[1]}]'")


def _failure(error: BaseException) -> dict[str, Any]:
    text = str(error).splitlines()[0] if str(error) else ""
    return {"state": "failed", "error": f"launcher: {type(error).__name__}: {text}", "success_rate": None,
            "best_success_rate": None, "val_loss": None, "wall_s": None}


def _local(jobs, parallel, on_state, on_done) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {pool.submit(run_cell, job, on_state): job for job in jobs}
        try:
            for future in concurrent.futures.as_completed(futures):
                on_done(futures[future], future.result())
        except BaseException:  # Ctrl-C / SIGTERM of the sweep: start no new cell, stop the running ones
            pool.shutdown(wait=False, cancel_futures=True)
            terminate_running()
            raise


def _submitit(jobs, parallel, options, sweep_dir, on_done) -> None:
    import submitit

    executor = submitit.AutoExecutor(folder=sweep_dir / ".submitit")
    # Cells resume, so a job that hits its time limit is finished by running the sweep again.
    parameters = {"timeout_min": 24 * 60, "cpus_per_task": jobs[0].threads, "slurm_array_parallelism": parallel,
                  "name": f"sweep-{sweep_dir.name}", **options}
    try:
        executor.update_parameters(**parameters)
    except (ValueError, TypeError) as e:
        raise UserError(f"--launcher-opt: {str(e).splitlines()[0]}") from None
    submitted = executor.map_array(run_cell, jobs)
    owner = {id(job_handle): job for job_handle, job in zip(submitted, jobs)}
    for handle in submitit.helpers.as_completed(submitted, poll_frequency=2):
        try:
            result = handle.result()
        except Exception as e:  # the job itself died (time limit, node failure): the cell stays resumable
            result = _failure(e)
        on_done(owner[id(handle)], result)


def _ray(jobs, options, on_done) -> None:
    import ray

    init = {k: options.pop(k) for k in ("address", "namespace", "include_dashboard") if k in options}
    ray.init(**init)
    remote = ray.remote(num_cpus=jobs[0].threads, **options)(run_cell)
    pending = {remote.remote(job): job for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except Exception as e:
            result = _failure(e)
        on_done(job, result)
