"""A reusable pool of `spawn` worker processes that run blocks of seeded episodes (see `lockstep`) of any checkpoint.

Start-up is what dominated short evaluations, so: the pool starts first (all workers at once), each worker
imports only what an episode needs (torch, robosuite, the policy family it loads; diffusers only for diffusion
policies, without importing torch._dynamo: `lean_startup`) and loads the checkpoint and builds its environments
itself; the main process never builds a policy.
A worker keeps the last checkpoint it loaded (keyed by path and file times, so a re-saved `last` is reloaded)
and its environments (keyed by env_args, so successive checkpoints of one run share them). One pool serves
every evaluation of a training run (in-training rollouts) or of a sweep, and `close` kills its workers rather
than waiting for their interpreters to exit (about a second each with torch and MuJoCo loaded).

With `device` (`eval --device cpu|cuda`) the policy runs in the main process instead, on that device: the
workers step their blocks' environments and send each re-plan's observation histories through a pipe; the main
process answers with the action chunks, one batched call per request, the same call a worker would make (so
the per-episode results are those of the in-worker path at the same block size, on the same device). The first
blocks are sent before the main process loads the policy: what a worker needs of it (`PolicySpec`) is in the
checkpoint's JSON, so the workers build and reset their environments while the main process imports torch.

Faults cost at most the episodes that caused them, never the run, and never a hang:
- an exception inside an episode (reset, step, observation) is recorded with that episode as `error`: the
  episode is missing, not a failure (`errored_record`; `eval --resume` runs it again); its block goes on;
- a worker process that dies (killed, out of memory, segfault) breaks the pool (`BrokenProcessPool`): the pool
  is rebuilt and the blocks that were running are run again, each one alone, so a block that kills its worker
  again is identified exactly and its episodes recorded with an error, and a one-off kill costs nothing;
- a block running longer than `episode_timeout_s` per episode in it has its episodes recorded with an error,
  the workers are killed and the pool rebuilt as above;
- workers die with the main process, even when it is killed with SIGKILL (`parent_death`): the pool's submits
  (which start the workers) are made from the thread that calls `evaluate`, which must outlive the pool;
- a checkpoint or environment that cannot be loaded or built is a setup failure: `UserError` (one line, exit 2)
  from the first worker that hits it; workers that die before any episode has finished end the same way.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_requests
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dopr_robot.errors import UserError, error_summary
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
    # Videos: the episodes of `video_seeds` run in a rendering environment with a recorder (see
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


def errored_record(seed: int, message: str, wall_s: float) -> dict[str, Any]:
    """The record of an episode that did not complete: missing from the rates (`evaluate.summarize`), not a
    failure, and run again by `eval --resume`."""
    return {"seed": seed, "success": None, "steps": None, "return": None, "wall_s": wall_s, "error": message}


# ----------------------------------------------------------------------------------------------- worker side
_worker: dict[str, Any] = {"token": None, "envs": {}, "link": None}


def _init_worker(parent: int, preload: tuple[str, str] | None, links: list | None, slot_counter) -> None:
    """Runs once per worker: dies with the main process (even a `kill -9` of it), one thread, no Ctrl-C
    tracebacks, its end of a pipe to the main process's policy (device mode), and (optionally) the first
    checkpoint loaded now, in parallel with the main process's own start-up (`lean_startup`). Never raises: a failure is kept
    and reported by the first task that needs it (a raising initializer would only give an anonymous
    BrokenProcessPool)."""
    from dopr_robot.parent_death import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and shuts the pool down
    if links is not None:
        with slot_counter.get_lock():
            slot, slot_counter.value = slot_counter.value, slot_counter.value + 1
        _worker["link"] = links[slot]
    with lean_startup():
        try:
            if links is None:
                import torch

                torch.set_num_threads(1)  # one core per worker; also keeps CPU float results independent of pool size
            if preload is not None:
                _load(*preload, with_policy=links is None)
        except BaseException:  # noqa: BLE001 - re-raised as a setup failure by the task that needs it
            pass


@contextmanager
def lean_startup():
    """A worker's start-up without two costs that buy it nothing (1.0 s of 3.0 s before, loading a diffusion
    policy and building its environment, measured in one process on a 2-core machine like CI's):
    - diffusers imports torch._dynamo at import time only to mark a few of its classes `allow_in_graph`, which
      matters only under torch.compile (never used in evaluation), and falls back to a no-op marker when that
      import fails. During start-up (where diffusers is imported) it is made to fail (0.7 s); afterwards it is
      importable again, so a later call that needs it (torch's `_disable_dynamo` functions) imports it then;
    - the garbage collector walks everything start-up creates (modules, the policy, its environment), though all
      of it lives as long as the worker (0.3 s). No collection runs until start-up ends, and then what it made
      is frozen, out of every later collection's walk.
    For a process of its own: in a longer-lived one, freezing would keep its garbage of the time forever."""
    blocked = "torch._dynamo" not in sys.modules
    if blocked:
        sys.modules["torch._dynamo"] = None  # what an import finds here raises ModuleNotFoundError
    gc.disable()
    try:
        yield
    finally:
        if blocked:
            del sys.modules["torch._dynamo"]
        gc.freeze()
        gc.enable()


def _load(token: str, checkpoint: str, with_policy: bool):
    """(policy or None, meta) of the checkpoint, cached; its plain environment is built too (a checkpoint whose
    environment cannot be built is a setup failure, found here)."""
    if _worker["token"] == token:
        if "error" in _worker:
            raise _worker["error"]
        return _worker["policy"], _worker["meta"]
    for key in ("policy", "meta", "error"):
        _worker.pop(key, None)
    _worker["token"] = token
    try:
        if with_policy:
            from dopr_robot.checkpoint import load_policy

            policy, meta = load_policy(checkpoint)
        else:
            policy, meta = None, json.loads(Path(checkpoint).read_text())
        _environments(meta, 1)
    except BaseException as e:  # noqa: BLE001
        _worker["error"] = e
        raise
    _worker.update(policy=policy, meta=meta)
    return policy, meta


def _environments(meta: dict[str, Any], n: int, render=None) -> list:
    """n environments of a checkpoint's env_args, observing its cameras at its image size (an image policy's),
    with an offscreen renderer for `render` (videos); kept for later blocks, those of other env_args or cameras
    closed (a worker serves one checkpoint's environment at a time)."""
    from dopr_robot.envs import ImageSpec, make_env

    env_args, images = meta["env_args"], ImageSpec.from_image_shapes(meta.get("image_shapes"))
    args_key = json.dumps([env_args, images], sort_keys=True)
    cache = _worker["envs"]
    for key in [k for k in cache if k[0] != args_key]:
        for env in cache.pop(key):
            env.close()
    envs = cache.setdefault((args_key, None if render is None else tuple(render)), [])
    while len(envs) < n:
        envs.append(make_env(env_args, render=render, images=images))
    return envs[:n]


class _RemotePlanner:
    """The worker's side of device mode: the plan comes from the main process's policy."""

    def __init__(self, link):
        self.link = link

    def plan(self, seeds, fresh, histories):
        self.link.send((seeds, fresh, histories))
        ok, payload = self.link.recv()
        if not ok:
            raise RuntimeError(f"the policy failed in the main process: {payload}")
        return payload


def _block_task(token: str, checkpoint: str, settings: EpisodeSettings, seeds: tuple[int, ...], spec) -> tuple:
    """("ok", [(seed, record, trajectory)]) | ("setup_error", message). `spec` is given in device mode (the
    worker has no policy), else None."""
    from dopr_robot.evaluation.lockstep import Planner, PolicySpec, run_block

    try:
        policy, meta = _load(token, checkpoint, with_policy=spec is None)
        plain = _environments(meta, len(seeds))
    except BaseException as e:  # noqa: BLE001
        return ("setup_error", error_summary(e))
    if spec is None:
        planner = _worker.get("planner")
        if planner is None or planner.policy is not policy:
            planner = _worker["planner"] = Planner(policy)
        plan, spec = planner.plan, PolicySpec.of(policy)
    else:
        plan = _RemotePlanner(_worker["link"]).plan
    envs, recorders, video_errors = list(plain), {}, {}
    recorded = [i for i, s in enumerate(seeds) if settings.video is not None and s in settings.video_seeds]
    if recorded:
        from dopr_robot.evaluation.video import VideoRecorder

        try:
            rendering = _environments(meta, len(recorded), render=settings.video.spec)
        except Exception as e:  # noqa: BLE001 - no videos, but the episodes run (in the plain environments)
            video_errors = {seeds[i]: error_summary(e) for i in recorded}
            rendering = []
        for i, env in zip(recorded, rendering):
            try:
                recorders[seeds[i]] = VideoRecorder(env, settings.video.directory, seeds[i], settings.video.fps)
                envs[i] = env
            except Exception as e:  # noqa: BLE001 - a recorder failure never fails its episode
                video_errors[seeds[i]] = error_summary(e)
    try:
        results = run_block(plan, envs, seeds, spec, meta["obs_keys"], settings.max_steps, settings.n_action_steps,
                            settings.perturbation, settings.record, recorders)
        for seed, recorder in recorders.items():
            if "error" not in results[seed].record:
                recorder.finish(results[seed].record["success"])
            if recorder.error:
                video_errors[seed] = recorder.error
    finally:
        for recorder in recorders.values():
            recorder.__exit__(None, None, None)  # a video not finished (its episode errored) is removed
    out = []
    for seed in seeds:
        result = results[seed]
        extra = {"video_error": video_errors[seed]} if seed in video_errors else {}
        out.append((seed, {**result.record, "worker_pid": os.getpid(), **extra}, result.trajectory))
    return ("ok", out)


def _ready() -> int:
    return os.getpid()


# ------------------------------------------------------------------------------------------------- main side
@dataclass
class Outcome:
    """The final result of one seed: its report record and, when recording, its robomimic Episode."""

    record: dict[str, Any]
    trajectory: Any = None


class EvalPool:
    """`with EvalPool(workers) as pool: pool.evaluate(checkpoint, blocks, settings)`, as often as needed.

    `device`: run the policy in this process on that device ("cpu", "cuda", "cuda:N"), the workers only step
    environments; None: each worker runs its own copy of the policy on its CPU core."""

    def __init__(self, workers: int, episode_timeout_s: float = 600.0, preload: Path | None = None,
                 device: str | None = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.episode_timeout_s = float(episode_timeout_s)
        self.device = device
        self._preload = (checkpoint_token(preload), str(preload)) if preload is not None else None
        self._executor: ProcessPoolExecutor | None = None
        self._links: list = []  # device mode: the main process's ends of the workers' pipes
        self._worker_ends: list = []
        self._planner: tuple[str, Any] | None = None  # device mode: (checkpoint token, Planner)
        self._start()

    def __enter__(self) -> "EvalPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        links, counter = None, None
        if self.device is not None:
            pairs = [ctx.Pipe() for _ in range(self.workers)]
            self._links, links = [a for a, _ in pairs], [b for _, b in pairs]
            self._worker_ends = links  # closed with the pool
            counter = ctx.Value("i", 0)
        self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                             initargs=(os.getpid(), self._preload, links, counter))
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
        self._close_links()

    def _close_links(self) -> None:
        for link in [*self._links, *self._worker_ends]:
            link.close()
        self._links, self._worker_ends = [], []

    def close(self) -> None:
        """Stop the workers. Every block has ended by now (or `evaluate` raised and stopped them already), so no
        worker has anything left to finish: they are killed rather than asked to exit, which would wait for each
        interpreter to tear down torch, MuJoCo and its environments (~1 s; 1.8 s of a 10 s evaluation)."""
        self._kill()

    def _device_planner(self, checkpoint: Path, token: str):
        """Device mode: the Planner of the policy, loaded here on `device` once per checkpoint version."""
        if self._planner is None or self._planner[0] != token:
            from dopr_robot.checkpoint import load_policy
            from dopr_robot.evaluation.lockstep import Planner

            policy, _ = load_policy(checkpoint, self.device)
            self._planner = (token, Planner(policy))
        self._planner[1].forget()
        return self._planner[1]

    def _serve(self, planner, timeout: float) -> None:
        """Device mode: answer every worker's pending re-plan request (waiting up to `timeout` for the first)."""
        for link in wait_for_requests(self._links, timeout=timeout):
            try:
                seeds, fresh, histories = link.recv()
            except (EOFError, OSError):  # its worker died: the pool notices through its futures
                continue
            try:
                reply = (True, planner.plan(seeds, fresh, histories))
            except Exception as e:  # noqa: BLE001 - costs the requesting block's running episodes
                reply = (False, error_summary(e))
            try:
                link.send(reply)
            except (BrokenPipeError, OSError):
                pass

    def evaluate(self, checkpoint: str | Path, blocks: Sequence[Sequence[int]], settings: EpisodeSettings,
                 on_outcome: Callable[[int, Outcome], None] | None = None) -> dict[int, Outcome]:
        """Run every block (`lockstep.episode_blocks`); `on_outcome(seed, outcome)` is called in this process for
        each episode as its block ends."""
        checkpoint = Path(checkpoint)
        token = checkpoint_token(checkpoint)  # equals the preloaded one while the files are unchanged
        spec, planner = None, None
        if self.device is not None:  # the workers need the spec, not the policy, to build and reset their episodes
            from dopr_robot.evaluation.lockstep import PolicySpec

            try:
                spec = PolicySpec.of_checkpoint(json.loads(checkpoint.read_text()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"checkpoint metadata {checkpoint} is malformed ({type(e).__name__}: {e})") from None
        outcomes: dict[int, Outcome] = {}
        pending = deque(tuple(b) for b in blocks)
        suspects: deque[tuple[int, ...]] = deque()  # running when a worker died: run again, one at a time, alone
        in_flight: dict[Future, tuple[tuple[int, ...], float, bool]] = {}  # future -> (block, submitted at, alone)
        deaths = 0

        def finish(seed: int, outcome: Outcome) -> None:
            outcomes[seed] = outcome
            if on_outcome is not None:
                on_outcome(seed, outcome)

        def failed(block: tuple[int, ...], message: str, wall: float) -> None:
            for seed in block:
                finish(seed, Outcome(errored_record(seed, message, wall)))

        def deadline(block: tuple[int, ...], t0: float) -> float:
            return t0 + self.episode_timeout_s * len(block)

        try:
            while pending or suspects or in_flight:
                if self._executor is None:
                    self._start()
                if suspects and not in_flight:
                    block = suspects.popleft()
                    in_flight[self._submit(token, checkpoint, settings, block, spec)] = (block, time.monotonic(), True)
                while pending and not suspects and len(in_flight) < self.workers:
                    block = pending.popleft()
                    in_flight[self._submit(token, checkpoint, settings, block, spec)] = (block, time.monotonic(), False)
                if self.device is not None and planner is None:  # loaded once the first blocks are on their way
                    planner = self._device_planner(checkpoint, token)
                now = time.monotonic()
                next_deadline = min(deadline(b, t0) for b, t0, _ in in_flight.values())
                wait_s = max(0.0, next_deadline - now) + 0.05
                if planner is not None:
                    self._serve(planner, timeout=min(wait_s, 0.01))
                    done = [f for f in in_flight if f.done()]
                else:
                    from concurrent.futures import FIRST_COMPLETED, wait

                    done, _ = wait(list(in_flight), timeout=wait_s, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    in_flight.pop(future)
                    if result[0] != "ok":
                        raise UserError(f"cannot evaluate {checkpoint}: {result[1]}")
                    for seed, record, trajectory in result[1]:
                        finish(seed, Outcome(record, trajectory))
                now = time.monotonic()
                for future, (block, t0, _) in list(in_flight.items()):
                    if now > deadline(block, t0) and not future.done():
                        in_flight.pop(future)
                        failed(block, f"timed out after {self.episode_timeout_s:g} s per episode of its block of "
                                      f"{len(block)} (its worker was stopped)", now - t0)
                        broken = True
                if broken:
                    self._kill()
                    for block, t0, alone in in_flight.values():
                        if alone:  # it ran by itself: it is what killed its worker, twice
                            deaths += 1
                            failed(block, "its worker process died twice (killed or crashed)", now - t0)
                        else:
                            suspects.append(block)
                    in_flight.clear()
                    if deaths >= 2 and not any("error" not in o.record for o in outcomes.values()):
                        raise UserError(f"cannot evaluate {checkpoint}: evaluation workers die before finishing "
                                        f"any episode (out of memory, or a crash while building the environment)")
        except BaseException:
            self._kill()
            raise
        return outcomes

    def _submit(self, token: str, checkpoint: Path, settings: EpisodeSettings, block: tuple[int, ...],
                spec) -> Future:
        return self._executor.submit(_block_task, token, str(checkpoint), settings, block, spec)
