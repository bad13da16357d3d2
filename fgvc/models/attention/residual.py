"""Residual attention (Wang et al., "Residual Attention Network for Image Classification", CVPR 2017).

    H(x) = (1 + M(x)) * T(x)                                              (eq. 3)

The mask branch M and the trunk branch T read the same input x (sec. 3, Fig. 2). T is the trunk: in
fgvc the backbone's own stage (stage placement) or residual branch (block placement), so pretrained
trunks stay as they are; M is the soft mask branch: bottom-up max pooling and residual units down to
a small map (two units at the lowest resolution, as in the paper's Attention-56/92 and their Caffe
models), top-down bilinear interpolation back (align_corners=True, as the reference's Caffe Interp
layer) with a skip connection at every scale, then BN-ReLU-1x1 conv, BN-ReLU-1x1 conv, sigmoid.

In the paper T keeps x's shape. A timm stage or residual branch may change it (a stride-2 first block,
more channels), so here M reads x (B, C_in, H_in, W_in), its last interpolation goes to T's grid and
its first 1x1 convolution maps C_in to T's C channels: with equal shapes this is exactly the paper's M.

`form="output_mask"` is a variant: (1 + M(T)) * T, the mask computed from the trunk's output, one
residual unit at the lowest resolution, upsampling with align_corners=False (results/attention.md
lists every such choice beside the paper's).

Mask depth from the feature size: the paper pools 56x56 maps three times, 28x28 twice and 14x14
once, i.e. down to about 7x7; `mask_depth(side)` reproduces that rule for any input. Maps smaller
than 14x14 are not pooled (depth 0): the mask is then the head alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_MASK_SIDE = 7  # the paper's mask branches stop pooling at 7x7 (56 -> 7, 28 -> 7, 14 -> 7)
MAX_MASK_DEPTH = 3  # the paper's deepest mask branch (attention module 1) pools three times
UNIT_BOTTLENECK = 4  # residual units are pre-activation bottlenecks with C/4 inner channels (He et al. 2016)
LOWEST_UNITS = 2  # residual units at the lowest resolution (the paper's 2r with r = 1; Caffe Attention-56/92)
FORMS = ("paper", "output_mask")  # paper: (1 + M(x)) * T(x); output_mask: (1 + M(T)) * T


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
    """The soft mask branch M: (B, C_in, H_in, W_in) -> (B, C, H, W) in (0, 1), (H, W) = `size` (default x's).

    `lowest_units`, `align_corners`: the paper's 2 and the reference's corner-to-corner upsampling
    (True, Caffe's Interp layer); the output_mask variant uses 1 and False."""

    def __init__(self, channels: int, depth: int, in_channels: int | None = None, lowest_units: int = LOWEST_UNITS,
                 align_corners: bool = True) -> None:
        super().__init__()
        c_in = in_channels or channels
        self.depth = depth
        self.align_corners = align_corners
        self.down = nn.ModuleList(PreActUnit(c_in) for _ in range(depth))  # after each max pool
        # the lowest resolution has `lowest_units` units: the last `down` unit and these
        self.lowest = nn.Sequential(*(PreActUnit(c_in) for _ in range(lowest_units - 1 if depth else 0)))
        self.skip = nn.ModuleList(PreActUnit(c_in) for _ in range(max(0, depth - 1)))
        self.up = nn.ModuleList(PreActUnit(c_in) for _ in range(max(0, depth - 1)))
        self.head = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), nn.Conv2d(c_in, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
        )

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:  # (B, C_in, H_in, W_in)
        sizes, skips, h = [], [], x
        for i, unit in enumerate(self.down):                      # bottom-up
            sizes.append(h.shape[-2:])
            h = unit(F.max_pool2d(h, 3, stride=2, padding=1))     # (B, C_in, H_in/2^(i+1), W_in/2^(i+1))
            if i < self.depth - 1:
                skips.append(self.skip[i](h))
        h = self.lowest(h)                                        # the lowest resolution's second unit
        for i in reversed(range(self.depth)):                     # top-down
            target = sizes[i] if i > 0 or size is None else size
            h = F.interpolate(h, size=target, mode="bilinear", align_corners=self.align_corners)
            if i > 0:
                h = self.up[i - 1](h + skips[i - 1])
        if size is not None and h.shape[-2:] != size:             # depth 0 and T on another grid
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=self.align_corners)
        return self.head(h).sigmoid()                             # (B, C, H, W)


class ResidualAttention(nn.Module):
    """Attention residual learning: (1 + M(x)) * T(x), given the trunk's output T and input x.

    `channels`, `feature_side`: T's channels and the side of the map the mask reads (x's, or T's with
    `form="output_mask"`); `in_channels`: x's channels (default T's).
    `identity_init`: (1 + gamma * M) * T with gamma = 0 at initialisation, so the block starts as the
    identity and reaches the paper's form at gamma = 1.

    Block placement calls the block with T alone, from the residual block's attention slot: the
    residual block's input x is handed over by `remember_input` (a forward pre-hook) just before.
    """

    def __init__(self, channels: int, feature_side: int, identity_init: bool = False, in_channels: int | None = None,
                 form: str = "paper") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"residual attention form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.reads_input = form == "paper"
        if self.reads_input:
            self.mask = SoftMask(channels, mask_depth(feature_side), in_channels)
        else:
            self.mask = SoftMask(channels, mask_depth(feature_side), lowest_units=1, align_corners=False)
        self.gamma = nn.Parameter(torch.zeros(())) if identity_init else None
        self._input: Tensor | None = None

    def remember_input(self, x: Tensor) -> None:
        self._input = x

    def forward(self, t: Tensor, x: Tensor | None = None) -> Tensor:  # T (B, C, H, W), x (B, C_in, H_in, W_in)
        if self.reads_input:
            x, self._input = (x if x is not None else self._input), None
            if x is None:
                raise RuntimeError("residual attention in the paper's form needs the trunk's input x")
            m = self.mask(x, t.shape[-2:])                        # M(x), (B, C, H, W)
        else:
            m = self.mask(t)                                      # M(T), (B, C, H, W)
        if self.gamma is not None:
            m = self.gamma * m
        return (1 + m) * t                                        # (B, C, H, W)
