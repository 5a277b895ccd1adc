"""Image observation encoder: one ResNet-18 per camera (GroupNorm in place of BatchNorm), random crop in training
and center crop at evaluation, then spatial-softmax keypoints or global average pooling, then a projection.

What the reference projects do (ANCHORS.md): robomimic's VisualCore (ResNet-18 trunk -> SpatialSoftmax with 32
keypoints -> Linear 64, crop 76 of 84); diffusion_policy the same with every BatchNorm a GroupNorm(C/16) and one
encoder per camera; the DoPr authors' flow-policy code global average pooling (512-d) -> Linear-LeakyReLU-Linear
to 256. Both poolings are here (`pool`).

The ResNet is our own (torchvision does not import beside the CPU torch this project targets), built so that its
`state_dict` keys and shapes at `width` 1 are torchvision's resnet18's: `load_torchvision_resnet18` loads
torchvision weights into it (GroupNorm takes BatchNorm's weight and bias; running statistics are dropped).
`width` multiplies every channel count (64, 128, 256, 512): a CPU config uses a narrow trunk.

Images arrive as uint8 (B, T, H, W, 3), top row first (robomimic's convention). They are cropped while still
uint8 (less memory), then scaled to [-1, 1] as diffusion_policy scales images. Random crops are drawn from the
training generator, one offset per image, so a run's crops are reproducible from its seed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dopr_robot.policies.base import draw

RESNET18_CHANNELS = (64, 128, 256, 512)


def group_norm(channels: int) -> nn.GroupNorm:
    """diffusion_policy's replacement for BatchNorm: groups of 16 channels (at least one group)."""
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (names conv1, bn1, conv2, bn2, downsample.0/1) with GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = group_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            group_norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Trunk(nn.Module):
    """ResNet-18 up to layer4 (no avgpool, no fc): (N, 3, H, W) -> (N, 512 * width, ~H/32, ~W/32)."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        channels = [channels_at(c, width) for c in RESNET18_CHANNELS]
        self.conv1 = nn.Conv2d(3, channels[0], 7, 2, 3, bias=False)
        self.bn1 = group_norm(channels[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        previous = channels[0]
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(previous, c, stride), BasicBlock(c, c, 1)))
            previous = c
        self.out_channels = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def channels_at(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def trunk_output_size(side: int) -> int:
    """Spatial side after the stride-2 stem conv, the max pool and three stride-2 stages (5 halvings, ceil)."""
    for _ in range(5):
        side = (side + 1) // 2
    return side


class SpatialSoftmax(nn.Module):
    """robomimic's SpatialSoftmax: a 1x1 conv to `keypoints` maps, a softmax over each map's positions, and the
    expected (x, y) of each in [-1, 1]: (N, C, H, W) -> (N, 2 * keypoints)."""

    def __init__(self, in_channels: int, keypoints: int):
        super().__init__()
        self.keypoint_conv = nn.Conv2d(in_channels, keypoints, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.keypoint_conv(x)
        n, k, h, w = maps.shape
        attention = F.softmax(maps.flatten(2), dim=-1)  # (N, K, H*W)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                                indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (H*W, 2)
        return (attention @ grid).flatten(1)


class CameraEncoder(nn.Module):
    """One camera: trunk -> pooling -> projection to `feature_dim`."""

    def __init__(self, width: float, pool: str, keypoints: int, feature_dim: int):
        super().__init__()
        self.trunk = ResNet18Trunk(width)
        c = self.trunk.out_channels
        if pool == "spatial_softmax":
            self.pool: nn.Module = SpatialSoftmax(c, keypoints)
            self.project: nn.Module = nn.Linear(2 * keypoints, feature_dim)
        else:  # "avg": the DoPr authors' choice
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.project = nn.Sequential(nn.Linear(c, feature_dim), nn.LeakyReLU(), nn.Linear(feature_dim, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(self.trunk(x)))


class ObservationEncoder(nn.Module):
    """Images of every camera -> one feature vector per observation step.

    `image_shapes` maps image keys (e.g. "agentview_image") to (H, W, 3); `crop` is the (square) side cropped
    from each image (0: no crop). forward takes {key: uint8 (B, T, H, W, 3)} and returns (B, T, n_cameras *
    feature_dim), cameras in sorted key order.
    """

    def __init__(self, image_shapes: dict[str, tuple[int, int, int]], width: float = 1.0, crop: int = 76,
                 pool: str = "spatial_softmax", keypoints: int = 32, feature_dim: int = 64):
        super().__init__()
        self.keys = sorted(image_shapes)
        self.image_shapes = {k: tuple(int(s) for s in image_shapes[k]) for k in self.keys}
        self.crop = int(crop)
        self.feature_dim = feature_dim
        # ModuleDict keys may not contain '.', image keys never do (robomimic: <camera>_image)
        self.cameras = nn.ModuleDict({k: CameraEncoder(width, pool, keypoints, feature_dim) for k in self.keys})

    @property
    def output_dim(self) -> int:
        return len(self.keys) * self.feature_dim

    def forward(self, images: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        features = []
        for key in self.keys:
            frames = images[key]
            b, t = frames.shape[:2]
            flat = self._crop(frames.reshape(b * t, *frames.shape[2:]), generator)
            x = flat.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # uint8 HWC -> float CHW in [-1, 1]
            features.append(self.cameras[key](x).reshape(b, t, -1))
        return torch.cat(features, dim=-1)

    def _crop(self, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(N, H, W, C) -> (N, crop, crop, C): a random window per image in training, the center in eval."""
        n, h, w = frames.shape[:3]
        size = self.crop
        if not size or (size == h and size == w):
            return frames
        if not self.training:
            top, left = (h - size) // 2, (w - size) // 2
            return frames[:, top:top + size, left:left + size]
        tops = draw(torch.randint, 0, h - size + 1, (n,), generator=generator, device=frames.device)
        lefts = draw(torch.randint, 0, w - size + 1, (n,), generator=generator, device=frames.device)
        offsets = torch.arange(size, device=frames.device)
        rows = (tops[:, None] + offsets)[:, :, None]  # (N, size, 1)
        cols = (lefts[:, None] + offsets)[:, None, :]  # (N, 1, size)
        return frames[torch.arange(n, device=frames.device)[:, None, None], rows, cols]


def build_encoder(cfg: Any, image_shapes: dict[str, tuple[int, int, int]]) -> ObservationEncoder:
    """`cfg` is a `dopr_robot.config.EncoderConfig` (or any object with its attributes)."""
    return ObservationEncoder(image_shapes, width=cfg.width, crop=cfg.crop, pool=cfg.pool, keypoints=cfg.keypoints,
                              feature_dim=cfg.feature_dim)


def load_torchvision_resnet18(trunk: ResNet18Trunk, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a torchvision resnet18 `state_dict` (e.g. ImageNet weights) into a width-1 trunk. BatchNorm's
    weight and bias become GroupNorm's; its running statistics and the classifier (`fc.*`) have no place here
    and are returned as the keys left out."""
    ours = trunk.state_dict()
    taken = {k: v for k, v in state_dict.items() if k in ours}
    missing = sorted(set(ours) - set(taken))
    if missing:
        raise ValueError(f"not a torchvision resnet18 state_dict for this trunk: {missing[0]} is missing")
    for key, value in taken.items():
        if value.shape != ours[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(ours[key].shape)} (width must be 1)")
    trunk.load_state_dict(taken)
    return sorted(set(state_dict) - set(taken))

