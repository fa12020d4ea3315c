"""2x spatial resampling: nearest-neighbour up / strided-conv or average-pool down."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Upsample(nn.Module):
    """[N x C x H x W] -> [N x C x 2H x 2W]: nearest-neighbour, then a 3x3 conv if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [N x C x 2H x 2W]
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """[N x C x H x W] -> [N x C x H/2 x W/2]: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)
