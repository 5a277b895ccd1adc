"""Per-dimension affine scaling to [-1, 1], with a floor on each dimension's range.

scale = 2 / max(max - min, range_floor), center = (max + min) / 2. Without the floor a near-constant training
dimension (a cube's resting height, a quaternion component) gets a huge scale, and the small deviations seen
at test time land far outside anything the network was trained on.
The statistics are buffers of the policy, so they are saved and loaded with its weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class RangeNormalizer(nn.Module):
    def __init__(self, minimum: np.ndarray | torch.Tensor, maximum: np.ndarray | torch.Tensor, range_floor: float):
        super().__init__()
        minimum = torch.as_tensor(np.asarray(minimum), dtype=torch.float32)
        maximum = torch.as_tensor(np.asarray(maximum), dtype=torch.float32)
        span = torch.clamp(maximum - minimum, min=range_floor)
        self.register_buffer("center", (maximum + minimum) / 2)
        self.register_buffer("scale", 2.0 / span)

    @classmethod
    def fit(cls, x: np.ndarray, range_floor: float) -> "RangeNormalizer":
        x = np.asarray(x)
        if x.shape[-1] == 0:  # no low-dim observations (an image-only policy): nothing to scale
            return cls(np.zeros(0), np.zeros(0), range_floor)
        x = x.reshape(-1, x.shape[-1])
        return cls(x.min(axis=0), x.max(axis=0), range_floor)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) * self.scale

    def unnormalize(self, y: torch.Tensor) -> torch.Tensor:
        return y / self.scale + self.center
