"""The interface every policy family shares, so trainer, evaluator and CLI treat diffusion and flow alike.

A policy maps a window of raw observations (B, n_obs_steps, obs_dim) to a chunk of raw actions
(B, horizon, action_dim). Normalization lives inside it (its statistics are buffers, saved with the weights);
the generative model over normalized chunks is the subclass's `_loss` / `_sample`.
"""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.policies.normalizer import RangeNormalizer


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where a random draw is made: on the generator's own device, then moved to the data's. A CPU generator
    thus gives the same draws whichever device the policy runs on, which is what makes validation losses and
    rollouts comparable between CPU and GPU runs (CPU and CUDA generators give different streams)."""
    return generator.device if generator is not None else device


def draw(sample, *args, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """`sample(*args)` (torch.randn, torch.rand, torch.randint, ...) from `generator`, made on `draw_device` and
    returned on `device`."""
    return sample(*args, generator=generator, device=draw_device(generator, device)).to(device)


class ActionChunkPolicy(nn.Module):
    def __init__(self, model: nn.Module, obs_normalizer: RangeNormalizer, action_normalizer: RangeNormalizer,
                 n_obs_steps: int, horizon: int, action_dim: int):
        super().__init__()
        self.model = model
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        self.action_dim = action_dim

    def io_layers(self) -> list[nn.Module]:
        """The backbone's layers that read raw inputs and its final projection (for `optim.matrix_layers`)."""
        return list(self.model.io_layers())

    def _condition(self, obs: torch.Tensor) -> torch.Tensor:
        return self.obs_normalizer.normalize(obs).flatten(1)

    def compute_loss(self, obs: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None,
                     rows: slice | None = None) -> torch.Tensor:
        """One-step training loss on a batch of raw (obs window, action chunk) pairs. With `rows`, the random
        draws are made for the whole batch and the loss is the mean over those rows only (data parallelism:
        the ranks' shares together are exactly the whole batch's step)."""
        return self._loss(self.action_normalizer.normalize(actions), self._condition(obs), generator, rows)

    @torch.no_grad()
    def predict_action(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample a raw action chunk (B, horizon, action_dim) for a batch of raw observation windows."""
        cond = self._condition(obs)
        shape = (obs.shape[0], self.horizon, self.action_dim)
        return self.action_normalizer.unnormalize(self._sample(shape, cond, generator))

    def _loss(self, actions: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
              rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, shape: tuple[int, ...], cond: torch.Tensor, generator: torch.Generator | None
                ) -> torch.Tensor:
        raise NotImplementedError
