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

from dopr_robot.datasets.images import ImageFrames, split_obs_keys
from dopr_robot.datasets.obs_keys import flatten_obs
from dopr_robot.datasets.robomimic_hdf5 import Episode


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
    """Every window of a set of episodes: low-dim data held as tensors (it fits in memory; no DataLoader
    needed), image keys read per batch as uint8 (`ImageFrames`), so a batch's observations are then the dict
    {"low_dim": (B, n_obs_steps, obs_dim), "<camera>_image": uint8 (B, n_obs_steps, H, W, 3)}. `image_cache`
    "memory" reads every frame once, up front, and keeps it as uint8 (see `ImageFrames`)."""

    def __init__(self, episodes: list[Episode], obs_keys: list[str], n_obs_steps: int, horizon: int,
                 n_action_steps: int, image_cache: str = "disk"):
        self.n_obs_steps = n_obs_steps
        low_dim_keys, image_keys = split_obs_keys(obs_keys, episodes[0].images if episodes else {})
        self.obs = torch.from_numpy(np.concatenate([flatten_obs(e.obs, low_dim_keys, len(e)) for e in episodes]))
        self.images = {k: ImageFrames([e.images[k] for e in episodes], in_memory=image_cache == "memory")
                       for k in image_keys}
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
        """(obs (B, n_obs_steps, obs_dim) or the image dict, actions (B, horizon, action_dim)) for the given
        window rows."""
        idx = self.index[rows]
        obs = self.obs[idx[:, : self.n_obs_steps]]
        if self.images:
            steps = idx[:, : self.n_obs_steps].cpu().numpy()
            obs = {"low_dim": obs, **{k: torch.from_numpy(frames.read(steps)).to(obs.device)
                                      for k, frames in self.images.items()}}
        return obs, self.actions[idx]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self), (batch_size,), generator=generator, device=generator.device)
        return self.batch(rows.to(self.index.device))
