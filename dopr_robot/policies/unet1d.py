"""Chi et al.'s ConditionalUnet1D (Diffusion Policy): a 1-D temporal UNet over the action chunk whose residual
blocks are FiLM-modulated (per-channel scale and bias) by the diffusion-step embedding and the observations.

Weights are Conv1d, ConvTranspose1d (upsampling), Linear (FiLM, step embedding) and GroupNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from dopr_robot.policies.embeddings import SinusoidalEmbedding


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList([
            Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
            Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
        ])
        self.out_channels = out_channels
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.blocks[0](x)
        scale, bias = self.cond_encoder(cond).unsqueeze(-1).chunk(2, dim=1)
        out = scale * out + bias
        out = self.blocks[1](out)
        return out + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """f(x_t (B, H, A), t (B,), obs_cond (B, C)) -> (B, H, A). H must be divisible by 2^(len(down_dims)-1)."""

    def __init__(self, action_dim: int, cond_dim: int, down_dims: list[int] = (256, 512, 1024),
                 kernel_size: int = 5, n_groups: int = 8, step_embed_dim: int = 256):
        super().__init__()
        dims = [action_dim, *down_dims]
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_embed_dim),
            nn.Linear(step_embed_dim, step_embed_dim * 4),
            nn.Mish(),
            nn.Linear(step_embed_dim * 4, step_embed_dim),
        )
        full_cond = step_embed_dim + cond_dim

        def block(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, full_cond, kernel_size, n_groups)

        pairs = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for level, (i, o) in enumerate(pairs):
            last = level == len(pairs) - 1
            self.down.append(nn.ModuleList([
                block(i, o), block(o, o),
                nn.Conv1d(o, o, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        mid = dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up = nn.ModuleList()
        for i, o in reversed(pairs[1:]):  # every up level upsamples: the unused top skip is Chi et al.'s design
            self.up.append(nn.ModuleList([
                block(o * 2, i), block(i, i), nn.ConvTranspose1d(i, i, 4, stride=2, padding=1),
            ]))
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def io_layers(self) -> list[nn.Module]:
        """The layers that read raw inputs and the final projection (Muon practice gives these AdamW,
        DOPR_SPEC.md): the time-step encoder's first Linear, the first block's convs on the noisy action chunk,
        every FiLM Linear (the observations enter the network only there) and the final 1x1 conv."""
        first = self.down[0][0]
        layers = [self.step_embed[1], first.blocks[0].block[0]]
        if isinstance(first.residual, nn.Conv1d):
            layers.append(first.residual)
        layers += [m.cond_encoder[1] for m in self.modules() if isinstance(m, ConditionalResidualBlock1D)]
        return layers + [self.final[1]]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = torch.cat([self.step_embed(t), cond], dim=-1)
        h = x.transpose(1, 2)  # (B, A, H): channels are action dims, length is time
        skips = []
        for res1, res2, downsample in self.down:
            h = res2(res1(h, c), c)
            skips.append(h)
            h = downsample(h)
        for res in self.mid:
            h = res(h, c)
        for res1, res2, upsample in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = upsample(res2(res1(h, c), c))
        return self.final(h).transpose(1, 2)
