"""Episodes in lockstep: one block of B seeded episodes, B environments, one batched policy call per re-plan.

A block is fixed by seed: block k of an evaluation holds seeds seed_start + kB .. seed_start + (k+1)B - 1
(`episode_blocks`), whichever worker runs it. Its episodes start together and re-plan together (every
`n_action_steps` steps); an episode that ends drops out, and the policy is called on the episodes still
running. So an episode's result depends on B and on its block (floating-point products differ with the batch's
size), never on the number of workers; B = 1 is the one-episode-at-a-time evaluation, bit for bit.

Each episode keeps its own random streams: the environment's reset, the policy's sampling noise (a
`torch.Generator` per episode, held by the `Planner`; `predict_action` draws each row's noise from its own
generator) and the perturbations (`perturb`). Sampling noise therefore does not depend on B either.

Faults cost their own episode: an environment (or a recorder's environment) that raises ends that episode with
an `error`, the others go on. A policy call that raises ends every episode of the block still running (the
call was theirs). The `Planner` runs where the policy is: in the worker (`LocalPlanner`), or in the main
process on an accelerator, reached through a pipe (`pool`). Importing this module is cheap (no torch): the
main process only needs `episode_blocks`.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from dopr_robot.evaluation.perturb import EpisodePerturber, Perturbation

if TYPE_CHECKING:
    from dopr_robot.evaluation.rollout import FrameRecorder

# (seeds, fresh, histories) -> action chunks (k, horizon, action_dim), one row per running episode; `fresh`
# says which episodes call for the first time (their generator starts from their seed).
PlanFn = Callable[[list[int], list[bool], list[deque]], np.ndarray]


def episode_blocks(seeds: Sequence[int], batch: int) -> list[tuple[int, ...]]:
    """The blocks of an evaluation whose episodes are `seeds` (consecutive, from its seed_start): block k holds
    seeds[kB:(k+1)B]."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return [tuple(seeds[i:i + batch]) for i in range(0, len(seeds), batch)]


@dataclass(frozen=True)
class PolicySpec:
    """What an episode needs to know of its policy without running it."""

    n_obs_steps: int
    action_dim: int
    obs_scale: np.ndarray  # the observation normalizer's scale: `obs_noise` is in normalized units
    image_keys: tuple[str, ...] = ()  # an image policy's encoder names them (the checkpoint's image_shapes)

    @classmethod
    def of(cls, policy) -> "PolicySpec":
        image_keys = tuple(policy.obs_encoder.keys) if policy.obs_encoder is not None else ()
        return cls(policy.n_obs_steps, policy.action_dim, policy.obs_normalizer.scale.cpu().numpy(), image_keys)

    @classmethod
    def of_checkpoint(cls, meta: dict[str, Any]) -> "PolicySpec":
        """The same, read from a checkpoint's JSON without building its policy (no torch): `load_policy` checks
        that the JSON's normalizer is the weights'. With it, device-mode workers start their episodes while the
        main process is still loading the policy."""
        scale = np.asarray(meta["normalizer"]["obs"]["scale"], dtype=np.float32)
        return cls(int(meta["config"]["data"]["n_obs_steps"]), int(meta["action_dim"]), scale,
                   tuple(sorted(meta.get("image_shapes") or {})))


class Planner:
    """Runs the policy for blocks of episodes: one batched call, each row's sampling noise from its episode's own
    generator (seeded by the episode's seed on its first call)."""

    def __init__(self, policy):
        self.policy = policy
        self.device = next(policy.parameters()).device
        self.image_keys = PolicySpec.of(policy).image_keys
        self._generators: dict[int, Any] = {}

    def plan(self, seeds: list[int], fresh: list[bool], histories: list[deque]) -> np.ndarray:
        import torch

        from dopr_robot.evaluation.rollout import policy_input

        for seed, first in zip(seeds, fresh):
            if first:
                self._generators[seed] = torch.Generator().manual_seed(seed)
        generators = [self._generators[s] for s in seeds]
        batch = policy_input(histories, self.image_keys, self.device)
        return self.policy.predict_action(batch, generators).cpu().numpy()

    def forget(self) -> None:
        self._generators.clear()


@dataclass
class EpisodeResult:
    """One episode of a block: its record ({seed, success, steps, return, wall_s[, push_step]} or, errored,
    {seed, error, ...}), its robomimic Episode when recording, and the exception when it raised."""

    record: dict[str, Any]
    trajectory: Any = None
    exception: BaseException | None = None


def located(error: BaseException) -> str:
    """`Type: message (at file:line)`, the line being where it was raised."""
    from dopr_robot.errors import error_summary

    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return error_summary(error) + where


class _Episode:
    """The running state of one episode of a block."""

    def __init__(self, env, seed: int, max_steps: int, n_action_steps: int, obs_keys: list[str], spec: PolicySpec,
                 perturbation: Perturbation, record: bool, recorder: FrameRecorder | None):
        from dopr_robot.datasets.images import split_obs_keys
        from dopr_robot.evaluation.rollout import flatten_observation

        self.env, self.seed, self.max_steps, self.n_action_steps = env, seed, max_steps, n_action_steps
        self.obs_keys, self.n_obs, self.record, self.recorder = obs_keys, spec.n_obs_steps, record, recorder
        self.low_dim_keys, self.image_keys = split_obs_keys(obs_keys, spec.image_keys)
        self.perturb = EpisodePerturber(perturbation, seed, max_steps, spec.action_dim, spec.obs_scale)
        self.calls = 0  # policy calls so far (the first one starts the episode's noise generator)
        self.steps, self.total_reward, self.wall_s, self.done = 0, 0.0, 0.0, False
        self.trajectory: dict[str, list] = {"obs": [], "states": [], "actions": []}
        start = time.perf_counter()
        self.obs = env.reset(seed)
        if recorder is not None:
            recorder.capture(env)
        self._flatten = flatten_observation
        # the first observation stands in for the past
        self.history = deque([self._seen(self.obs)] * self.n_obs, maxlen=self.n_obs)
        self.wall_s += time.perf_counter() - start

    def _seen(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """What the policy sees of one observation: its (perturbed) low-dim vector and its camera frames."""
        return (self.perturb.observation(self._flatten(obs, self.low_dim_keys)), {k: obs[k] for k in self.image_keys})

    def execute(self, chunk: np.ndarray) -> None:
        """Run the chunk's actions from the current one on (`n_action_steps` of them, fewer if the episode ends)."""
        start = time.perf_counter()
        env, obs_keys = self.env, self.obs_keys
        for action in chunk[self.n_obs - 1: self.n_obs - 1 + self.n_action_steps]:
            action = self.perturb.action(action)
            if self.record:
                self.trajectory["obs"].append({k: self.obs[k] for k in obs_keys})
                self.trajectory["states"].append(env.get_state())
                self.trajectory["actions"].append(action)
            if self.perturb.push_step == self.steps + 1:
                env.push_object(self.perturb.push_velocity)
            self.obs, reward = env.step(action)
            if self.recorder is not None:
                self.recorder.capture(env)
            self.steps += 1
            self.total_reward += reward
            self.history.append(self._seen(self.obs))
            self.done = (env.success_ends_episode and env.is_success()) or env.terminated or \
                self.steps >= self.max_steps
            if self.done:
                break
        self.wall_s += time.perf_counter() - start

    def result(self) -> EpisodeResult:
        success = self.env.is_success()  # where success does not end the episode, it is judged at its end
        record: dict[str, Any] = {"seed": self.seed, "success": bool(success), "steps": self.steps,
                                  "return": self.total_reward, "wall_s": self.wall_s}
        if self.perturb.push_step is not None:
            record["push_step"] = self.perturb.push_step if self.perturb.push_step <= self.steps else None
        return EpisodeResult(record, _robomimic_episode(self.trajectory, self.low_dim_keys, self.image_keys,
                                                        self.seed, success) if self.record else None)


def run_block(plan: PlanFn, envs: Sequence[Any], seeds: Sequence[int], spec: PolicySpec, obs_keys: list[str],
              max_steps: int, n_action_steps: int, perturbation: Perturbation | None = None, record: bool = False,
              recorders: dict[int, FrameRecorder] | None = None) -> dict[int, EpisodeResult]:
    """Run the episodes of `seeds` together, episode i in `envs[i]`; {seed: EpisodeResult}. `wall_s` of an
    episode is its own environment time plus its share of the batched policy calls it took part in."""
    from dopr_robot.evaluation.pool import errored_record

    perturbation = perturbation or Perturbation()
    recorders = recorders or {}
    results: dict[int, EpisodeResult] = {}
    running: list[_Episode] = []

    def failed(seed: int, error: BaseException, wall_s: float) -> None:
        results[seed] = EpisodeResult(errored_record(seed, located(error), wall_s), exception=error)

    for env, seed in zip(envs, seeds):
        try:
            running.append(_Episode(env, seed, max_steps, n_action_steps, obs_keys, spec, perturbation, record,
                                    recorders.get(seed)))
        except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on
            failed(seed, e, 0.0)
    while running:
        start = time.perf_counter()
        try:
            chunks = plan([e.seed for e in running], [e.calls == 0 for e in running], [e.history for e in running])
        except Exception as e:  # noqa: BLE001 - the call was every running episode's
            for episode in running:
                failed(episode.seed, e, episode.wall_s)
            break
        share = (time.perf_counter() - start) / len(running)
        for episode, chunk in zip(running, chunks):
            episode.calls += 1
            episode.wall_s += share
            try:
                episode.execute(chunk)
            except Exception as e:  # noqa: BLE001 - this episode is lost, its block goes on
                failed(episode.seed, e, episode.wall_s)
                continue
            if episode.done:
                try:
                    results[episode.seed] = episode.result()
                except Exception as e:  # noqa: BLE001
                    failed(episode.seed, e, episode.wall_s)
        running = [e for e in running if e.seed not in results]
    return results


def _robomimic_episode(trajectory: dict[str, list], low_dim_keys: list[str], image_keys: list[str], seed: int,
                       success: bool):
    from dopr_robot.datasets.robomimic_hdf5 import Episode

    return Episode(obs={k: np.stack([o[k] for o in trajectory["obs"]]) for k in low_dim_keys},
                   images={k: np.stack([o[k] for o in trajectory["obs"]]) for k in image_keys},
                   actions=np.asarray(trajectory["actions"], dtype=np.float32),
                   states=np.asarray(trajectory["states"]), attrs={"seed": seed, "success": bool(success)})
