"""Open-loop action-chunk error: the policy fed demo observations, its sampled chunk against the demo's chunk.

For every window of the held-out demos (cut exactly as training cuts them, `WindowDataset`), sample one chunk
from the policy and compare it with the demonstrated chunk in the policy's normalized action space (each action
dimension scaled to [-1, 1] by the checkpoint's action normalizer, so dimensions weigh alike):

    open_loop_chunk_mse = mean over windows, horizon steps and action dims of (a_pred - a_demo)^2

This is what a validation metric can see; closed-loop success is what the policy does when its own actions
choose the next observation. Sampling noise comes from one generator seeded with `seed` (recorded).
"""

from __future__ import annotations

import torch

from dopr_robot.datasets import WindowDataset
from dopr_robot.datasets.robomimic_hdf5 import Episode
from dopr_robot.policies import ActionChunkPolicy

BATCH = 512


@torch.no_grad()
def open_loop_chunk_mse(policy: ActionChunkPolicy, episodes: list[Episode], obs_keys: list[str],
                        n_action_steps: int, seed: int) -> tuple[float, int]:
    """(normalized chunk MSE, number of windows) over every window of `episodes` (must be non-empty)."""
    windows = WindowDataset(episodes, obs_keys, policy.n_obs_steps, policy.horizon, n_action_steps)
    device = next(policy.parameters()).device
    generator = torch.Generator().manual_seed(seed)  # CPU draws: the same numbers on any device
    total, count = 0.0, 0
    for start in range(0, len(windows), BATCH):
        rows = torch.arange(start, min(start + BATCH, len(windows)))
        obs, actions = windows.batch(rows)
        predicted = policy.predict_action(obs.to(device), generator)
        norm = policy.action_normalizer.normalize
        total += float(((norm(predicted) - norm(actions.to(device))) ** 2).sum())
        count += actions.numel()
    return total / count, len(windows)
