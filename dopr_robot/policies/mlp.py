"""A small MLP denoiser: the whole action chunk is flattened, conditioned on time and observations by
concatenation into every residual block (cheap on CPU, strong on low-dim tasks)."""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.policies.embeddings import SinusoidalEmbedding


class ResidualBlock(nn.Module):
    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim + cond_dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.act = nn.Mish()

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(torch.cat([self.norm(h), cond], dim=-1))))


class MLPDenoiser(nn.Module):
    """f(x_t (B, H, A), t (B,), obs_cond (B, C)) -> (B, H, A)."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden_dim: int = 512, num_layers: int = 4,
                 step_embed_dim: int = 128):
        super().__init__()
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_embed_dim), nn.Linear(step_embed_dim, step_embed_dim), nn.Mish()
        )
        full_cond = cond_dim + step_embed_dim
        self.input = nn.Linear(horizon * action_dim + full_cond, hidden_dim)
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim, full_cond) for _ in range(num_layers))
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, horizon * action_dim))

    def io_layers(self) -> list[nn.Module]:
        """The layers that read raw inputs (time-step encoder, the input layer on the noisy chunk and the
        observations) and the final projection: Muon practice gives these AdamW (DOPR_SPEC.md)."""
        return [self.step_embed[1], self.input, self.output[1]]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, A = x.shape
        c = torch.cat([cond, self.step_embed(t)], dim=-1)
        h = self.input(torch.cat([x.reshape(B, H * A), c], dim=-1))
        for block in self.blocks:
            h = block(h, c)
        return self.output(h).reshape(B, H, A)
