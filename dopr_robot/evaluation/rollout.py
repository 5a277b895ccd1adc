"""One closed-loop episode: observe, predict a chunk of `horizon` actions, execute `n_action_steps`, re-plan.

The episode's seed fixes the environment's initial state, the policy's sampling noise and (through separate
generators, see `perturb`) any perturbation, so an episode is reproducible on its own, whichever worker runs
it. With `record`, every step's observation, MuJoCo state and executed action are kept (robomimic layout),
which is what drift-from-demonstration analyses need. A `recorder` (e.g. a video frame grabber) gets
`recorder.capture(env)` after the reset and after every environment step.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Protocol

import numpy as np
import torch

from dopr_robot.datasets.images import split_obs_keys
from dopr_robot.datasets.windows import flatten_obs
from dopr_robot.evaluation.perturb import EpisodePerturber, Perturbation


class FrameRecorder(Protocol):
    def capture(self, env: Any) -> None: ...


def flatten_observation(obs: dict[str, np.ndarray], low_dim_keys: list[str]) -> np.ndarray:
    """One observation -> the policy's flat float32 low-dim vector, by the same code that flattens training
    data (image keys are left to `policy_input`)."""
    return flatten_obs({k: np.asarray(obs[k])[None] for k in low_dim_keys}, low_dim_keys, 1)[0]


def policy_input(history: deque, image_keys: list[str], device: torch.device) -> torch.Tensor | dict[str, torch.Tensor]:
    """The episode's last n_obs_steps observations, as (low-dim vector as the policy sees it, raw observation)
    pairs -> the policy's input: a (1, n_obs_steps, obs_dim) tensor, or with image keys the dict
    {"low_dim": (1, n_obs_steps, obs_dim), "<camera>_image": uint8 (1, n_obs_steps, H, W, 3)}."""
    low_dim = torch.from_numpy(np.stack([seen for seen, _ in history]))[None].to(device)
    if not image_keys:
        return low_dim
    return {"low_dim": low_dim, **{k: torch.from_numpy(np.stack([obs[k] for _, obs in history]))[None].to(device)
                                   for k in image_keys}}


def run_episode(policy, env, seed: int, max_steps: int, n_action_steps: int, obs_keys: list[str],
                record: bool = False, perturbation: Perturbation | None = None,
                recorder: FrameRecorder | None = None) -> tuple[dict[str, Any], Any]:
    """Returns ({seed, success, steps, return, wall_s[, push_step]}, robomimic Episode or None)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    n_obs = policy.n_obs_steps
    perturb = EpisodePerturber(perturbation or Perturbation(), seed, max_steps, policy.action_dim,
                               policy.obs_normalizer.scale.cpu().numpy())
    # an image policy's encoder names its image keys (the checkpoint's image_shapes); the rest are low-dim
    low_dim_keys, image_keys = split_obs_keys(obs_keys, policy.obs_encoder.keys if policy.obs_encoder else ())

    obs = env.reset(seed)
    if recorder is not None:
        recorder.capture(env)
    seen_obs = perturb.observation(flatten_observation(obs, low_dim_keys))
    history = deque([(seen_obs, obs)] * n_obs, maxlen=n_obs)  # the first observation stands in for the past
    trajectory: dict[str, list] = {"obs": [], "states": [], "actions": []}
    steps, total_reward = 0, 0.0
    done = False
    while not done:
        chunk = policy.predict_action(policy_input(history, image_keys, device), generator)[0].cpu().numpy()
        for action in chunk[n_obs - 1 : n_obs - 1 + n_action_steps]:
            action = perturb.action(action)
            if record:
                trajectory["obs"].append({k: obs[k] for k in obs_keys})
                trajectory["states"].append(env.get_state())
                trajectory["actions"].append(action)
            if perturb.push_step == steps + 1:
                env.push_object(perturb.push_velocity)
            obs, reward = env.step(action)
            if recorder is not None:
                recorder.capture(env)
            steps += 1
            total_reward += reward
            history.append((perturb.observation(flatten_observation(obs, low_dim_keys)), obs))
            done = (env.success_ends_episode and env.is_success()) or env.terminated or steps >= max_steps
            if done:
                break
    success = env.is_success()  # where success does not end the episode, it is judged at its end
    result: dict[str, Any] = {"seed": seed, "success": bool(success), "steps": steps, "return": total_reward,
                              "wall_s": time.perf_counter() - start}
    if perturb.push_step is not None:
        result["push_step"] = perturb.push_step if perturb.push_step <= steps else None  # None: ended before
    return result, (_episode(trajectory, low_dim_keys, image_keys, seed, success) if record else None)


def _episode(trajectory: dict[str, list], low_dim_keys: list[str], image_keys: list[str], seed: int, success: bool):
    from dopr_robot.datasets.robomimic_hdf5 import Episode

    return Episode(obs={k: np.stack([o[k] for o in trajectory["obs"]]) for k in low_dim_keys},
                   images={k: np.stack([o[k] for o in trajectory["obs"]]) for k in image_keys},
                   actions=np.asarray(trajectory["actions"], dtype=np.float32),
                   states=np.asarray(trajectory["states"]), attrs={"seed": seed, "success": bool(success)})
