"""CBAM (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018).

    F'  = M_c(F) * F,   M_c(F)  = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))        (eq. 1-2)
    F'' = M_s(F') * F', M_s(F') = sigmoid(f7x7([AvgPool_c(F'); MaxPool_c(F')]))      (eq. 1, 3)

The shared MLP has 2 C^2 / r weights (+ C/r + C biases), the spatial convolution 2 k^2 weights
(+ 2 for the batch norm the authors' code puts after it).

Differences between the authors' code and timm's `CbamModule`, all options here (defaults follow
the authors' code):
- `mlp_bias`: the authors' MLP has biases; timm's has none.
- `spatial_order`: the authors concatenate [max; mean] over channels, timm [mean; max].
- `spatial_norm`: both put a batch norm after the 7x7 convolution; False drops it (eq. 3 as written).

`CBAM.forward_paper` is the formulation above, term by term (channel mean and `amax`). On the CPU,
where the pooling and elementwise passes over the feature map, not the multiply-adds, are the cost,
`CBAM.forward` takes `forward_cpu` instead, which computes the same numbers (equal up to float
rounding; tests/test_attention.py checks values and gradients):
- the channel mean of F' is one batched matrix-vector product over x instead of a reduction over F';
- the channel max is taken by pairwise halving (`channel_max`): elementwise maxima of contiguous
  channel halves, exact, faster than `amax(1)`, a reduction over a strided dimension, on the CPU (on
  a GPU halving would launch about log2(C) kernels where `amax` launches one);
- F' is the only full-size tensor allocated, and without autograd F'' is written into it in place;
  with `inplace=True` (the block's input is its own, as in a residual block's attention slot) F' is
  written into x too, and inference allocates no full-size tensor at all.
Measured side by side on this project's 2-core CPU (results/cbam_paths.md: ResNet-50's maps, batch 8,
inference) it takes 0.25-0.35 of `forward_paper`'s time on the largest map, (256, 56), and 0.75-1.08
on the smaller ones, where the machine's noise is as large as the difference; it has not been
measured on a GPU, so every other device runs `forward_paper`. In both paths the MLP runs once on
the stacked (2B, C) average and max vectors as linear layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fgvc.models.attention.common import apply_gate, make_gamma
from fgvc.models.attention.se import reduced_width

SPATIAL_ORDERS = ("max_mean", "mean_max")


class ChannelGate(nn.Module):
    """M_c (eq. 2): shared MLP over the average- and max-pooled vectors, (B, C, H, W) -> (B, C)."""

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True) -> None:
        super().__init__()
        hidden = reduced_width(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:                                    # (B, C, H, W)
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))])                   # (2B, C)
        scores = self.fc2(self.act(self.fc1(pooled)))                          # (2B, C)
        avg, mx = scores.chunk(2)                                              # (B, C) each
        return (avg + mx).sigmoid()                                            # (B, C)


def channel_max(x: Tensor) -> Tensor:
    """max_c x, (B, C, H, W) -> (B, 1, H, W), by pairwise halving (exact; works with autograd)."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        top = torch.maximum(x[:, :half], x[:, half:2 * half])                  # (B, C // 2, H, W)
        if x.shape[1] % 2:  # an odd channel left over joins the first
            top = torch.cat([torch.maximum(top[:, :1], x[:, 2 * half:]), top[:, 1:]], 1)
        x = top
    return x


class SpatialGate(nn.Module):
    """M_s (eq. 3): sigmoid(conv_kxk([max_c; mean_c])), (B, C, H, W) -> (B, 1, H, W)."""

    def __init__(self, kernel_size: int = 7, order: str = "max_mean", norm: bool = True, bn_momentum: float = 0.1,
                 bn_zero_init: bool = False) -> None:
        """`bn_momentum`, `bn_zero_init`: the batch norm after the conv; the authors' code uses momentum 0.01
        and its ResNet zero-initialises the weight (M_s = sigmoid(bias) = 1/2 everywhere at the start)."""
        super().__init__()
        if order not in SPATIAL_ORDERS:
            raise ValueError(f"spatial order must be one of {SPATIAL_ORDERS}, got {order!r}")
        self.max_first = order == "max_mean"
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=bn_momentum) if norm else nn.Identity()
        if norm and bn_zero_init:
            nn.init.zeros_(self.bn.weight)

    def forward(self, x: Tensor, mean: Tensor | None = None) -> Tensor:        # (B, C, H, W)
        """`mean`: mean_c(x) precomputed by CBAM's CPU path, which also takes max_c by halving."""
        if mean is None:  # the paper
            mean, mx = x.mean(1, keepdim=True), x.amax(1, keepdim=True)        # (B, 1, H, W) each
        else:
            mx = channel_max(x)                                                # (B, 1, H, W)
        pooled = torch.cat([mx, mean] if self.max_first else [mean, mx], 1)    # (B, 2, H, W)
        return self.bn(self.conv(pooled)).sigmoid()                            # (B, 1, H, W)


class CBAM(nn.Module):
    """Channel gate, then spatial gate on the channel-refined map (eq. 1)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, mlp_bias: bool = True,
                 spatial_order: str = "max_mean", spatial_norm: bool = True, identity_init: bool = False,
                 inplace: bool = False, spatial_bn_momentum: float = 0.1, spatial_bn_zero_init: bool = False) -> None:
        """`inplace`: in inference, write the output into x (only where nothing else reads x).
        `spatial_bn_momentum`, `spatial_bn_zero_init`: see `SpatialGate` (the authors' code: 0.01, True)."""
        super().__init__()
        self.inplace = inplace
        self.channel = ChannelGate(channels, reduction, mlp_bias)
        self.spatial = SpatialGate(kernel_size, spatial_order, spatial_norm, spatial_bn_momentum, spatial_bn_zero_init)
        self.gamma_channel = make_gamma(identity_init)
        self.gamma_spatial = make_gamma(identity_init)

    def forward(self, x: Tensor) -> Tensor:                                    # (B, C, H, W)
        return self.forward_cpu(x) if x.device.type == "cpu" else self.forward_paper(x)

    def forward_paper(self, x: Tensor) -> Tensor:                              # (B, C, H, W)
        refined = apply_gate(x, self.channel(x)[:, :, None, None], self.gamma_channel)  # F' = M_c(F) * F
        return apply_gate(refined, self.spatial(refined), self.gamma_spatial)  # F'' = M_s(F') * F'

    def forward_cpu(self, x: Tensor) -> Tensor:                                # (B, C, H, W)
        """`forward_paper`'s numbers with fewer passes over the feature map (module docstring)."""
        b, c, h, w = x.shape
        weights = self.channel(x)                                              # M_c, (B, C)
        if self.gamma_channel is not None:
            weights = 1 + self.gamma_channel * (weights - 1)                   # identity start
        # mean_c(F') = sum_c M_c x_c / C: one batched matrix-vector product over x, cheaper than a
        # channel reduction over F' on the CPU (equal up to float rounding); taken before x may be overwritten
        mean = torch.bmm((weights / c).unsqueeze(1), x.reshape(b, c, h * w)).view(b, 1, h, w)  # (B, 1, H, W)
        refined = apply_gate(x, weights[:, :, None, None], None, self.inplace)  # F', (B, C, H, W)
        s = self.spatial(refined, mean)                                        # M_s, (B, 1, H, W)
        # `refined` is this block's own tensor (or x, when the block may overwrite it)
        return apply_gate(refined, s, self.gamma_spatial, inplace=True)        # F'', (B, C, H, W)

    def load_timm(self, timm_cbam: nn.Module) -> None:
        """Copy timm's CbamModule weights (build this block with mlp_bias=False, spatial_order='mean_max')."""
        for ours, theirs in ((self.channel.fc1, timm_cbam.channel.fc1), (self.channel.fc2, timm_cbam.channel.fc2)):
            ours.weight.data.copy_(theirs.weight.data.flatten(1))
            if ours.bias is not None and theirs.bias is not None:
                ours.bias.data.copy_(theirs.bias.data)
        self.spatial.conv.weight.data.copy_(timm_cbam.spatial.conv.conv.weight.data)
        if isinstance(self.spatial.bn, nn.BatchNorm2d):
            self.spatial.bn.load_state_dict(timm_cbam.spatial.conv.bn.state_dict())
