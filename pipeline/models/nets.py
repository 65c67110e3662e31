"""Shared building blocks: residual conv blocks and the convolutional encoder/decoder."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) x 2, with an optional embedding added."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: Optional[int] = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch) if emb_dim else None
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is not None and emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_channels(base: int, mults: Sequence[int]) -> list[int]:
    return [base * m for m in mults]


def check_divisible(image_size: int, mults: Sequence[int]) -> None:
    factor = 2 ** (len(mults) - 1)
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by 2^(levels-1) = {factor} for channel_mults "
                         f"{list(mults)}; use fewer levels or another image size")


def resolution_levels(chs: Sequence[int], res_blocks: int, resample: type[nn.Module]) -> tuple[list[nn.Module], int]:
    """Residual blocks at each level's width, with ``resample`` (down or up) between levels."""
    layers: list[nn.Module] = []
    prev = chs[0]
    for level, ch in enumerate(chs):
        for _ in range(res_blocks):
            layers.append(ResBlock(prev, ch))
            prev = ch
        if level < len(chs) - 1:
            layers.append(resample(ch))
    return layers, prev


class ConvEncoder(nn.Module):
    """Image -> flat feature vector, halving the resolution between levels."""

    def __init__(self, in_ch: int, image_size: int, base: int, mults: Sequence[int], res_blocks: int) -> None:
        super().__init__()
        check_divisible(image_size, mults)
        chs = level_channels(base, mults)
        levels, prev = resolution_levels(chs, res_blocks, Downsample)
        layers: list[nn.Module] = [nn.Conv2d(in_ch, chs[0], 3, padding=1), *levels,
                                   group_norm(prev), nn.SiLU(), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = prev * (image_size // 2 ** (len(chs) - 1)) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Flat vector -> image parameters (out_ch channels), doubling the resolution between levels."""

    def __init__(self, in_features: int, out_ch: int, image_size: int, base: int, mults: Sequence[int],
                 res_blocks: int) -> None:
        super().__init__()
        check_divisible(image_size, mults)
        chs = level_channels(base, mults)[::-1]
        self.start = image_size // 2 ** (len(chs) - 1)
        self.top = chs[0]
        self.fc = nn.Linear(in_features, chs[0] * self.start ** 2)
        levels, prev = resolution_levels(chs, res_blocks, Upsample)
        layers: list[nn.Module] = [*levels, group_norm(prev), nn.SiLU(), nn.Conv2d(prev, out_ch, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.top, self.start, self.start))
