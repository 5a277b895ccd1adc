"""One closed-loop episode: observe, predict a chunk of `horizon` actions, execute `n_action_steps`, re-plan.

The episode's seed fixes both the environment's initial state and the policy's sampling noise, so an episode
is reproducible on its own, whichever worker runs it. With `record`, every step's observation, MuJoCo state
and executed action are kept (robomimic layout), which is what drift-from-demonstration analyses need.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import torch

from dopr_robot.datasets.robomimic_hdf5 import Episode
from dopr_robot.envs import RobosuiteEnv
from dopr_robot.policies import ActionChunkPolicy


def _flat(obs: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).ravel() for k in keys])


def run_episode(policy: ActionChunkPolicy, env: RobosuiteEnv, seed: int, max_steps: int, n_action_steps: int,
                obs_keys: list[str], record: bool = False, recorder=None) -> tuple[dict[str, Any], Episode | None]:
    """`recorder` (optional): `recorder.capture(env)` runs after reset and after every step (steps + 1 calls)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    device = next(policy.parameters()).device
    n_obs = policy.n_obs_steps
    obs = env.reset(seed)
    if recorder is not None:
        recorder.capture(env)
    history = deque([_flat(obs, obs_keys)] * n_obs, maxlen=n_obs)  # the first observation stands in for the past
    seen: list[dict[str, np.ndarray]] = []
    states, actions = [], []
    steps, total_reward, success = 0, 0.0, False
    while steps < max_steps and not success:
        window = torch.from_numpy(np.stack(history))[None].to(device)
        chunk = policy.predict_action(window, generator)[0].cpu().numpy()
        for action in chunk[n_obs - 1 : n_obs - 1 + n_action_steps]:
            if record:
                seen.append({k: obs[k] for k in obs_keys})
                states.append(env.get_state())
                actions.append(action)
            obs, reward = env.step(action)
            if recorder is not None:
                recorder.capture(env)
            steps += 1
            total_reward += reward
            history.append(_flat(obs, obs_keys))
            success = env.is_success()
            if success or steps >= max_steps:
                break
    result = {"seed": seed, "success": bool(success), "steps": steps, "return": total_reward,
              "wall_s": time.perf_counter() - start}
    trajectory = None
    if record:
        trajectory = Episode(
            obs={k: np.stack([s[k] for s in seen]) for k in obs_keys}, actions=np.asarray(actions, dtype=np.float32),
            states=np.asarray(states), attrs={"seed": seed, "success": bool(success)},
        )
    return result, trajectory
