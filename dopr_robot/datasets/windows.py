"""Training samples: windows of `n_obs_steps` observations and `horizon` actions, as diffusion_policy cuts them.

A window starting at step s covers steps s .. s+horizon-1 of one episode; the policy is conditioned on the
first `n_obs_steps` observations and predicts all `horizon` actions, of which steps n_obs_steps-1 ..
n_obs_steps+n_action_steps-2 are executed. Starts run from -(n_obs_steps-1) to T-horizon+(n_action_steps-1), and
steps outside the episode repeat its first or last step (edge padding), so every real step can be the
current step of some window and every chunk near the end still has `horizon` actions.
"""

from __future__ import annotations

import numpy as np
import torch

from dopr_robot.datasets.robomimic_hdf5 import Episode


def flatten_obs(obs: dict[str, np.ndarray], obs_keys: list[str]) -> np.ndarray:
    """Concatenate the chosen observation keys along the last axis, in the given order."""
    return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(len(obs[k]), -1) for k in obs_keys], axis=-1)


def window_indices(lengths: list[int], horizon: int, pad_before: int, pad_after: int) -> np.ndarray:
    """(num_windows, horizon) indices into the episodes' concatenated steps, edge-padded within each episode."""
    rows = []
    offset = 0
    for T in lengths:
        starts = np.arange(-pad_before, T - horizon + pad_after + 1)
        steps = np.clip(starts[:, None] + np.arange(horizon)[None, :], 0, T - 1)
        rows.append(offset + steps)
        offset += T
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, horizon), dtype=np.int64)


class WindowDataset:
    """Every window of a set of episodes, held as tensors (low-dim data fits in memory; no DataLoader needed)."""

    def __init__(self, episodes: list[Episode], obs_keys: list[str], n_obs_steps: int, horizon: int,
                 n_action_steps: int):
        self.n_obs_steps = n_obs_steps
        self.obs = torch.from_numpy(np.concatenate([flatten_obs(e.obs, obs_keys) for e in episodes]))
        self.actions = torch.from_numpy(np.concatenate([e.actions for e in episodes]).astype(np.float32))
        self.index = torch.from_numpy(
            window_indices([len(e) for e in episodes], horizon, n_obs_steps - 1, n_action_steps - 1)
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device) -> "WindowDataset":
        self.obs, self.actions, self.index = self.obs.to(device), self.actions.to(device), self.index.to(device)
        return self

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(obs (B, n_obs_steps, obs_dim), actions (B, horizon, action_dim)) for the given window rows."""
        idx = self.index[rows]
        return self.obs[idx[:, : self.n_obs_steps]], self.actions[idx]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self), (batch_size,), generator=generator, device=generator.device)
        return self.batch(rows.to(self.index.device))
