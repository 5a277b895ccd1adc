"""One closed-loop episode: observe, predict a chunk of `horizon` actions, execute `n_action_steps`, re-plan.

The episode's seed fixes the environment's initial state, the policy's sampling noise and (through separate
generators, see `perturb`) any perturbation, so an episode is reproducible on its own, whichever worker runs
it. With `record`, every step's observation, MuJoCo state and executed action are kept (robomimic layout),
which is what drift-from-demonstration analyses need. A `recorder` (e.g. a video frame grabber) gets
`recorder.capture(env)` after the reset and after every environment step.

The loop itself is `lockstep.run_block` (B episodes together); `run_episode` is its block of one. What the
policy sees of the running episodes is `policy_input` of their observation histories.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol, Sequence

import numpy as np

from dopr_robot.datasets.obs_keys import flatten_obs  # numpy only: a worker without the policy needs no torch
from dopr_robot.evaluation.perturb import Perturbation


class FrameRecorder(Protocol):
    def capture(self, env: Any) -> None: ...


def flatten_observation(obs: dict[str, np.ndarray], low_dim_keys: list[str]) -> np.ndarray:
    """One observation -> the policy's flat float32 low-dim vector, by the same code that flattens training
    data (image keys are left to `policy_input`)."""
    return flatten_obs({k: np.asarray(obs[k])[None] for k in low_dim_keys}, low_dim_keys, 1)[0]


def policy_input(histories: Sequence[deque], image_keys: Sequence[str], device):
    """The running episodes' last n_obs_steps observations, each history a deque of (low-dim vector as the policy
    sees it, {image key: frame}) pairs, oldest first -> the policy's input: a float32 (episodes, n_obs_steps,
    obs_dim) tensor, or with image keys the dict {"low_dim": that tensor, "<camera>_image": uint8 (episodes,
    n_obs_steps, H, W, 3)}, on `device`."""
    import torch

    low_dim = torch.from_numpy(np.stack([np.stack([seen for seen, _ in h]) for h in histories])).to(device)
    if not image_keys:
        return low_dim
    return {"low_dim": low_dim, **{k: torch.from_numpy(np.stack([np.stack([frames[k] for _, frames in h])
                                                                 for h in histories])).to(device)
                                   for k in image_keys}}


def run_episode(policy, env, seed: int, max_steps: int, n_action_steps: int, obs_keys: list[str],
                record: bool = False, perturbation: Perturbation | None = None,
                recorder: FrameRecorder | None = None) -> tuple[dict[str, Any], Any]:
    """Returns ({seed, success, steps, return, wall_s[, push_step]}, robomimic Episode or None); raises what the
    episode raised."""
    from dopr_robot.evaluation.lockstep import Planner, PolicySpec, run_block

    result = run_block(Planner(policy).plan, [env], [seed], PolicySpec.of(policy), obs_keys, max_steps,
                       n_action_steps, perturbation, record, {seed: recorder} if recorder is not None else None)[seed]
    if result.exception is not None:
        raise result.exception
    return result.record, result.trajectory
