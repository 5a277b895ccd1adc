"""The interface every policy family shares, so trainer, evaluator and CLI treat diffusion and flow alike.

A policy maps a window of raw observations (B, n_obs_steps, obs_dim) to a chunk of raw actions
(B, horizon, action_dim). Normalization lives inside it (its statistics are buffers, saved with the weights);
the generative model over normalized chunks is the subclass's `_loss` / `_sample`.

A policy with an `obs_encoder` (image observations, see `encoder`) takes a dict window instead:
{"low_dim": float32 (B, n_obs_steps, obs_dim), "<camera>_image": uint8 (B, n_obs_steps, H, W, 3)}; the encoder's
features of every step join the normalized low-dim features in the denoiser's global condition, and the encoder
trains with the denoiser (its random crops drawn from the same generator as the noise).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dopr_robot.policies.normalizer import RangeNormalizer


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where a random draw is made: on the generator's own device, then moved to the data's. A CPU generator
    thus gives the same draws whichever device the policy runs on, which is what makes validation losses and
    rollouts comparable between CPU and GPU runs (CPU and CUDA generators give different streams)."""
    return generator.device if generator is not None else device


def draw(sample, *args, generator: torch.Generator | Sequence[torch.Generator] | None,
         device: torch.device) -> torch.Tensor:
    """`sample(*args)` (torch.randn, torch.rand, torch.randint, ...) from `generator`, made on `draw_device` and
    returned on `device`. With one generator per batch row (`sample(shape)` only; evaluation keeps one per
    episode), row i is drawn from generator i, as it would be in a batch of one: a row's noise does not depend
    on which rows share its batch."""
    if isinstance(generator, (list, tuple)):
        (shape,) = args
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([draw(sample, (1, *shape[1:]), generator=g, device=device) for g in generator])
    return sample(*args, generator=generator, device=draw_device(generator, device)).to(device)


class ActionChunkPolicy(nn.Module):
    def __init__(self, model: nn.Module, obs_normalizer: RangeNormalizer, action_normalizer: RangeNormalizer,
                 n_obs_steps: int, horizon: int, action_dim: int, obs_encoder: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.obs_encoder = obs_encoder
        self.obs_normalizer = obs_normalizer
        self.action_normalizer = action_normalizer
        self.n_obs_steps = n_obs_steps
        self.horizon = horizon
        self.action_dim = action_dim

    def io_layers(self) -> list[nn.Module]:
        """The backbone's layers that read raw inputs and its final projection (for `optim.matrix_layers`)."""
        layers = list(self.model.io_layers())
        if self.obs_encoder is not None:  # the stem convs read raw pixels
            layers += [camera.trunk.conv1 for camera in self.obs_encoder.cameras.values()]
        return layers

    def _condition(self, obs: torch.Tensor | dict[str, torch.Tensor],
                   generator: torch.Generator | None = None) -> torch.Tensor:
        if self.obs_encoder is None:
            return self.obs_normalizer.normalize(obs).flatten(1)
        low_dim = self.obs_normalizer.normalize(obs["low_dim"])
        features = self.obs_encoder({k: obs[k] for k in self.obs_encoder.keys}, generator)
        return torch.cat([low_dim, features], dim=-1).flatten(1)

    def compute_loss(self, obs: torch.Tensor | dict[str, torch.Tensor], actions: torch.Tensor, generator: torch.Generator | None = None,
                     rows: slice | None = None) -> torch.Tensor:
        """One-step training loss on a batch of raw (obs window, action chunk) pairs. With `rows`, the random
        draws are made for the whole batch and the loss is the mean over those rows only (data parallelism:
        the ranks' shares together are exactly the whole batch's step)."""
        cond = self._condition(obs, generator)  # image crops are drawn before the noise
        return self._loss(self.action_normalizer.normalize(actions), cond, generator, rows)

    @torch.no_grad()
    def predict_action(self, obs: torch.Tensor | dict[str, torch.Tensor],
                       generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Sample a raw action chunk (B, horizon, action_dim) for a batch of raw observation windows; `generator`
        may be one per row (see `draw`)."""
        cond = self._condition(obs)
        shape = (cond.shape[0], self.horizon, self.action_dim)
        return self.action_normalizer.unnormalize(self._sample(shape, cond, generator))

    def _loss(self, actions: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None,
              rows: slice | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, shape: tuple[int, ...], cond: torch.Tensor, generator: torch.Generator | None
                ) -> torch.Tensor:
        raise NotImplementedError
