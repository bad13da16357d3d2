"""Residual attention (Wang et al., "Residual Attention Network for Image Classification", CVPR 2017).

    H(x) = (1 + M(x)) * T(x)                                              (eq. 3)

T is the trunk branch: in fgvc the backbone's own stage (stage placement) or residual branch (block
placement), so pretrained trunks stay as they are. M is the soft mask branch (Fig. 2): bottom-up
max pooling and residual units down to a small map, top-down bilinear interpolation back with a
skip connection at every scale, then BN-ReLU-1x1 conv, BN-ReLU-1x1 conv, sigmoid; M is
(B, C, H, W) in (0, 1).

Mask depth from the feature size: the paper pools 56x56 maps three times, 28x28 twice and 14x14
once, i.e. down to about 7x7; `mask_depth(side)` reproduces that rule for any input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_MASK_SIDE = 7  # the paper's mask branches stop pooling at 7x7 (56 -> 7, 28 -> 7, 14 -> 7)
MAX_MASK_DEPTH = 3  # the paper's deepest mask branch (attention module 1) pools three times
UNIT_BOTTLENECK = 4  # residual units are pre-activation bottlenecks with C/4 inner channels (He et al. 2016)


def mask_depth(side: int) -> int:
    """Max-pooling steps of the soft mask branch for a feature map of this side (0 for maps <= 13)."""
    if side < 2 * MIN_MASK_SIDE:
        return 0
    return min(MAX_MASK_DEPTH, int(math.floor(math.log2(side / MIN_MASK_SIDE))))


class PreActUnit(nn.Module):
    """Pre-activation bottleneck residual unit: x + conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(relu(bn(x))))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // UNIT_BOTTLENECK)
        self.branch = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, inner, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner), nn.ReLU(inplace=True), nn.Conv2d(inner, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class SoftMask(nn.Module):
    """The soft mask branch M(x): (B, C, H, W) -> (B, C, H, W) in (0, 1)."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.down = nn.ModuleList(PreActUnit(channels) for _ in range(depth))  # after each max pool
        self.skip = nn.ModuleList(PreActUnit(channels) for _ in range(max(0, depth - 1)))
        self.up = nn.ModuleList(PreActUnit(channels) for _ in range(max(0, depth - 1)))
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:                       # (B, C, H, W)
        sizes, skips, h = [], [], x
        for i, unit in enumerate(self.down):                      # bottom-up
            sizes.append(h.shape[-2:])
            h = unit(F.max_pool2d(h, 3, stride=2, padding=1))     # (B, C, H/2^(i+1), W/2^(i+1))
            if i < self.depth - 1:
                skips.append(self.skip[i](h))
        for i in reversed(range(self.depth)):                     # top-down
            h = F.interpolate(h, size=sizes[i], mode="bilinear", align_corners=False)
            if i > 0:
                h = self.up[i - 1](h + skips[i - 1])
        return self.head(h).sigmoid()                             # (B, C, H, W)


class ResidualAttention(nn.Module):
    """Attention residual learning on a trunk output T: (1 + M(T)) * T.

    `identity_init`: (1 + gamma * M) * T with gamma = 0 at initialisation, so the block starts as the
    identity and reaches the paper's form at gamma = 1.
    """

    def __init__(self, channels: int, feature_side: int, identity_init: bool = False) -> None:
        super().__init__()
        self.mask = SoftMask(channels, mask_depth(feature_side))
        self.gamma = nn.Parameter(torch.zeros(())) if identity_init else None

    def forward(self, t: Tensor) -> Tensor:                       # (B, C, H, W)
        m = self.mask(t)                                          # (B, C, H, W)
        if self.gamma is not None:
            m = self.gamma * m
        return (1 + m) * t                                        # (B, C, H, W)
