"""Residual MLP backbones (the DoPr paper's Humanoid behaviour-cloning policy is a residual MLP with LayerNorm).

`ResMLP` is a plain pre-LayerNorm residual stack: an input projection, `num_blocks` blocks
h + W2 act(W1 LayerNorm(h)) with an inner width of `expansion` x `hidden_dim`, and a LayerNorm + Linear output.
Unlike the `mlp` backbone (mlp.py), which concatenates the condition into every block, the inputs enter only
once, through the input projection: every hidden Linear then reads a LayerNorm-ed (or activated) residual
stream, the setting in which activation-wise preconditioning acts on well-scaled activations.

`ResMLPDenoiser` is the backbone of diffusion / flow policies (noisy chunk, time and observations in);
`ResMLPHead` the backbone of the deterministic BC policy (observations in, action chunk out).
"""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.policies.embeddings import SinusoidalEmbedding


class ResMLPBlock(nn.Module):
    def __init__(self, dim: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)
        self.act = nn.Mish()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h))))


class ResMLP(nn.Module):
    """(B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, num_blocks: int = 3, expansion: int = 4):
        super().__init__()
        self.input = nn.Linear(in_dim, hidden_dim)
        self.blocks = nn.Sequential(*(ResMLPBlock(hidden_dim, expansion) for _ in range(num_blocks)))
        self.output = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, out_dim))

    def io_layers(self) -> list[nn.Module]:
        """The input projection (it reads the raw inputs) and the final projection."""
        return [self.input, self.output[1]]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(self.blocks(self.input(z)))


class ResMLPDenoiser(nn.Module):
    """f(x_t (B, H, A), t (B,), obs_cond (B, C)) -> (B, H, A), for diffusion and flow policies."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden_dim: int = 256, num_blocks: int = 3,
                 expansion: int = 4, step_embed_dim: int = 128):
        super().__init__()
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_embed_dim), nn.Linear(step_embed_dim, step_embed_dim), nn.Mish()
        )
        self.net = ResMLP(horizon * action_dim + cond_dim + step_embed_dim, horizon * action_dim, hidden_dim,
                          num_blocks, expansion)

    def io_layers(self) -> list[nn.Module]:
        """The time-step encoder's Linear, the input projection and the final projection (AdamW under Muon
        practice, DOPR_SPEC.md)."""
        return [self.step_embed[1]] + self.net.io_layers()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, A = x.shape
        return self.net(torch.cat([x.reshape(B, H * A), cond, self.step_embed(t)], dim=-1)).reshape(B, H, A)


class ResMLPHead(nn.Module):
    """obs_cond (B, C) -> action chunk (B, H, A), for the deterministic BC policy."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, hidden_dim: int = 256, num_blocks: int = 3,
                 expansion: int = 4):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        self.net = ResMLP(cond_dim, horizon * action_dim, hidden_dim, num_blocks, expansion)

    def io_layers(self) -> list[nn.Module]:
        return self.net.io_layers()

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond).reshape(cond.shape[0], self.horizon, self.action_dim)
