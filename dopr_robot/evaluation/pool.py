"""A reusable pool of `spawn` worker processes that run seeded episodes of any checkpoint.

Start-up is what dominated short evaluations, so: the pool starts first (all workers at once), each worker
imports only what an episode needs (torch, robosuite, the policy family it loads; diffusers only for diffusion
policies) and loads the checkpoint and builds the environment itself; the main process never builds a policy.
A worker keeps the last checkpoint it loaded (keyed by path and file times, so a re-saved `last` is reloaded)
and the last environment (keyed by env_args, so successive checkpoints of one run share it). One pool serves
every evaluation of a training run (in-training rollouts) or of a sweep.

Faults cost at most the episode that caused them, never the run, and never a hang:
- an exception inside an episode (reset, step, policy) is recorded with that episode as `error`: the episode is
  missing, not a failure (`errored_record`; `eval --resume` runs it again);
- a worker process that dies (killed, out of memory, segfault) breaks the pool (`BrokenProcessPool`): the pool
  is rebuilt and the episodes that were running are run again, each one alone, so an episode that kills its
  worker again is identified exactly and recorded with an error, and a one-off kill costs nothing;
- an episode running longer than `episode_timeout_s` is recorded with an error, the workers are killed and the
  pool rebuilt as above;
- workers die with the main process, even when it is killed with SIGKILL (`parent_death`): the pool's submits
  (which start the workers) are made from the thread that calls `evaluate`, which must outlive the pool;
- a checkpoint or environment that cannot be loaded or built is a setup failure: `UserError` (one line, exit 2)
  from the first worker that hits it; workers that die before any episode has finished end the same way.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dopr_robot.errors import UserError
from dopr_robot.evaluation.perturb import Perturbation

if TYPE_CHECKING:
    from dopr_robot.evaluation.video import VideoPlan


@dataclass(frozen=True)
class EpisodeSettings:
    """What every episode of one evaluation shares (picklable; sent with each task)."""

    max_steps: int
    n_action_steps: int
    record: bool = False
    perturbation: Perturbation = field(default_factory=Perturbation)
    # Videos: the episodes of `video_seeds` run in the worker's rendering environment with a recorder (see
    # evaluation/video.py); rendering only reads the simulation, so they are the same episodes.
    video: VideoPlan | None = None
    video_seeds: frozenset[int] = frozenset()


def checkpoint_token(checkpoint: Path) -> str:
    """Identifies one saved version of a checkpoint (a worker reloads when it changes): the JSON's content
    (it holds the step) and the weights file's time and size."""
    import hashlib

    weights = checkpoint.with_suffix(".safetensors").stat()
    digest = hashlib.sha1(checkpoint.read_bytes()).hexdigest()
    return f"{checkpoint.resolve()}:{digest}:{weights.st_mtime_ns}:{weights.st_size}"


# ----------------------------------------------------------------------------------------------- worker side
_worker: dict[str, Any] = {"token": None, "env_key": None, "rendering": None}


def describe(error: BaseException) -> str:
    """`Type: first line of the message`, for a record's `error`."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def errored_record(seed: int, message: str, wall_s: float) -> dict[str, Any]:
    """The record of an episode that did not complete: missing from the rates (`evaluate.summarize`), not a
    failure, and run again by `eval --resume`."""
    return {"seed": seed, "success": None, "steps": None, "return": None, "wall_s": wall_s, "error": message}


def _init_worker(parent: int, preload: tuple[str, str] | None) -> None:
    """Runs once per worker: dies with the main process (even a `kill -9` of it), one thread, no Ctrl-C
    tracebacks, and (optionally) the first checkpoint loaded now, in parallel with the main process's own
    start-up. Never raises: a failure is kept and reported by the first task that needs it (a raising
    initializer would only give an anonymous BrokenProcessPool)."""
    from dopr_robot.parent_death import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and shuts the pool down
    try:
        import torch

        torch.set_num_threads(1)  # one core per worker; also keeps CPU float results independent of pool size
        if preload is not None:
            _load(*preload)
    except BaseException:  # noqa: BLE001 - re-raised as a setup failure by the task that needs it
        pass


def _load(token: str, checkpoint: str):
    if _worker["token"] == token:
        if "error" in _worker:
            raise _worker["error"]
        return _worker["policy"], _worker["meta"], _worker["env"]
    for key in ("policy", "meta", "error"):
        _worker.pop(key, None)
    _worker["token"] = token
    try:
        import json

        from dopr_robot.checkpoint import load_policy
        from dopr_robot.envs import ImageSpec, make_env

        policy, meta = load_policy(checkpoint)
        images = ImageSpec.from_image_shapes(meta.get("image_shapes"))  # the checkpoint's cameras, at its size
        env_key = json.dumps([meta.get("env_args"), images], sort_keys=True)
        if _worker["env_key"] != env_key:
            if _worker.get("env") is not None:
                _worker["env"].close()
            _worker["env"], _worker["env_key"] = None, None
            _worker["env"] = make_env(meta["env_args"], images=images)
            _worker["env_key"] = env_key
    except BaseException as e:  # noqa: BLE001
        _worker["error"] = e
        raise
    _worker.update(policy=policy, meta=meta)
    return policy, meta, _worker["env"]


def _episode_task(token: str, checkpoint: str, settings: EpisodeSettings, seed: int) -> tuple:
    """("ok", result, trajectory) | ("episode_error", message) | ("setup_error", message)."""
    try:
        policy, meta, env = _load(token, checkpoint)
    except BaseException as e:  # noqa: BLE001
        return ("setup_error", describe(e))
    try:
        from dopr_robot.evaluation.rollout import run_episode

        if settings.video is None or seed not in settings.video_seeds:
            result, trajectory = run_episode(policy, env, seed, settings.max_steps, settings.n_action_steps,
                                             meta["obs_keys"], record=settings.record,
                                             perturbation=settings.perturbation)
            return ("ok", {**result, "worker_pid": os.getpid()}, trajectory)
        from dopr_robot.envs import ImageSpec
        from dopr_robot.evaluation.video import RenderingEnvironment

        if _worker["rendering"] is None:
            _worker["rendering"] = RenderingEnvironment()
        try:
            recorder = _worker["rendering"].recorder(settings.video, meta["env_args"], seed,
                                                     ImageSpec.from_image_shapes(meta.get("image_shapes")))
        except Exception as e:  # noqa: BLE001 - no video, but the episode runs (in the plain environment)
            result, trajectory = run_episode(policy, env, seed, settings.max_steps, settings.n_action_steps,
                                             meta["obs_keys"], record=settings.record,
                                             perturbation=settings.perturbation)
            return ("ok", {**result, "worker_pid": os.getpid(), "video_error": describe(e)}, trajectory)
        with recorder:  # a partial video is removed if the episode raises
            result, trajectory = run_episode(policy, recorder.env, seed, settings.max_steps,
                                             settings.n_action_steps, meta["obs_keys"], record=settings.record,
                                             perturbation=settings.perturbation, recorder=recorder)
            recorder.finish(result["success"])
        video_error = {"video_error": recorder.error} if recorder.error else {}
        return ("ok", {**result, "worker_pid": os.getpid(), **video_error}, trajectory)
    except Exception as e:  # noqa: BLE001 - the episode is lost, the worker and the run go on
        where = traceback.extract_tb(e.__traceback__)[-1]
        return ("episode_error", f"{describe(e)} (at {Path(where.filename).name}:{where.lineno})")


def _ready() -> int:
    return os.getpid()


# ------------------------------------------------------------------------------------------------- main side
@dataclass
class Outcome:
    """The final result of one seed: its report record and, when recording, its robomimic Episode."""

    record: dict[str, Any]
    trajectory: Any = None


class EvalPool:
    """`with EvalPool(workers) as pool: pool.evaluate(checkpoint, seeds, settings)`, as often as needed."""

    def __init__(self, workers: int, episode_timeout_s: float = 600.0, preload: Path | None = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.episode_timeout_s = float(episode_timeout_s)
        self._preload = (checkpoint_token(preload), str(preload)) if preload is not None else None
        self._executor: ProcessPoolExecutor | None = None
        self._start()

    def __enter__(self) -> "EvalPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._executor = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(os.getpid(), self._preload))
        for _ in range(self.workers):  # a spawn-context executor starts a process per submit: start them all now
            self._executor.submit(_ready)

    def _kill(self) -> None:
        """Stop every worker now (a hung or broken pool) and forget the executor."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        processes = list(getattr(executor, "_processes", {}).values())
        for process in processes:
            if process.is_alive():
                process.kill()
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=5)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def evaluate(self, checkpoint: str | Path, seeds: list[int], settings: EpisodeSettings,
                 on_outcome: Callable[[int, Outcome], None] | None = None) -> dict[int, Outcome]:
        """Run one episode per seed; `on_outcome(seed, outcome)` is called in this process as each one ends."""
        checkpoint = Path(checkpoint)
        token = checkpoint_token(checkpoint)  # equals the preloaded one while the files are unchanged
        outcomes: dict[int, Outcome] = {}
        pending = deque(seeds)
        suspects: deque[int] = deque()  # running when a worker died: run again, one at a time, alone
        in_flight: dict[Future, tuple[int, float, bool]] = {}  # future -> (seed, submitted at, alone)
        deaths = 0

        def finish(seed: int, outcome: Outcome) -> None:
            outcomes[seed] = outcome
            if on_outcome is not None:
                on_outcome(seed, outcome)

        def failed(seed: int, message: str, wall: float) -> None:
            finish(seed, Outcome(errored_record(seed, message, wall)))

        try:
            while pending or suspects or in_flight:
                if self._executor is None:
                    self._start()
                if suspects and not in_flight:
                    seed = suspects.popleft()
                    in_flight[self._submit(token, checkpoint, settings, seed)] = (seed, time.monotonic(), True)
                while pending and not suspects and len(in_flight) < self.workers:
                    seed = pending.popleft()
                    in_flight[self._submit(token, checkpoint, settings, seed)] = (seed, time.monotonic(), False)
                now = time.monotonic()
                next_deadline = min(t0 for _, t0, _ in in_flight.values()) + self.episode_timeout_s
                done, _ = wait(list(in_flight), timeout=max(0.0, next_deadline - now) + 0.05,
                               return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    seed, t0, _ = in_flight.pop(future)
                    if result[0] == "ok":
                        finish(seed, Outcome(result[1], result[2]))
                    elif result[0] == "episode_error":
                        failed(seed, result[1], time.monotonic() - t0)
                    else:
                        raise UserError(f"cannot evaluate {checkpoint}: {result[1]}")
                now = time.monotonic()
                for future, (seed, t0, _) in list(in_flight.items()):
                    if now - t0 > self.episode_timeout_s and not future.done():
                        in_flight.pop(future)
                        failed(seed, f"timed out after {self.episode_timeout_s:g} s (its worker was stopped)",
                               now - t0)
                        broken = True
                if broken:
                    self._kill()
                    for seed, t0, alone in in_flight.values():
                        if alone:  # it ran by itself: it is what killed its worker, twice
                            deaths += 1
                            failed(seed, "its worker process died twice (killed or crashed)", now - t0)
                        else:
                            suspects.append(seed)
                    in_flight.clear()
                    if deaths >= 2 and not any("error" not in o.record for o in outcomes.values()):
                        raise UserError(f"cannot evaluate {checkpoint}: evaluation workers die before finishing "
                                        f"any episode (out of memory, or a crash while building the environment)")
        except BaseException:
            self._kill()
            raise
        return outcomes

    def _submit(self, token: str, checkpoint: Path, settings: EpisodeSettings, seed: int) -> Future:
        return self._executor.submit(_episode_task, token, str(checkpoint), settings, seed)
