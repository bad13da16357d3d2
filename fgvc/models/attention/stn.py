"""Spatial transformer (Jaderberg et al., "Spatial Transformer Networks", NIPS 2015).

A localisation network predicts a transform theta (B, 2, 3) of the input (sec. 3.1); the sampling
grid T_theta(G) (eq. 1) is sampled bilinearly (eq. 5) to give the backbone's input. As in the
paper's CUB experiments (sec. 4.3), the transform is an *attention* transform, scale and
translation only:

    theta = [[s, 0, tx], [0, s, ty]],  s = 1 - (1 - MIN_SCALE) * tanh(softplus(a) - ln 2),
    tx, ty = relu(1 - s) * tanh(bx, by)

so the window always keeps its aspect, never shrinks below MIN_SCALE of the image, never grows
beyond a bounded zoom-out, and (when it zooms in) stays inside the image. The raw outputs (a, bx,
by) start at zero, which is exactly the identity transform: the network starts by looking at the
whole image. An unbounded affine regression trained from scratch at the recipes' learning rates
flew out of the image within the first epoch and left the backbone a black input (measured: chance
accuracy on the synthetic set); the bounded form cannot.

The identity grid reproduces the input only up to float rounding of the grid coordinates; with
`identity_init` the output is x + gamma * (sampled - x), gamma = 0 at initialisation, which is exactly x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOC_SIDE = 64  # the localisation network sees the image at 64x64: where to look needs no fine detail
LOC_WIDTHS = (16, 32, 64)  # channels of its three stride-2 convolutions
LOC_HIDDEN = 64  # width of its fully connected layer
MIN_SCALE = 0.35  # smallest window side, as a fraction of the image: below it too few pixels are resampled
LN2 = math.log(2.0)  # softplus(0): makes a = 0 the identity


class Localization(nn.Module):
    """f_loc: image (B, 3, H, W) -> attention transform theta (B, 2, 3), identity at initialisation."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        layers, c = [], in_channels
        for width in LOC_WIDTHS:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c, LOC_HIDDEN), nn.ReLU(inplace=True), nn.Linear(LOC_HIDDEN, 3))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, x: Tensor) -> Tensor:                        # (B, 3, H, W)
        small = F.interpolate(x, size=(LOC_SIDE, LOC_SIDE), mode="bilinear", align_corners=False)
        a, b = self.fc(self.features(small)).split([1, 2], dim=1)  # (B, 1), (B, 2)
        s = 1 - (1 - MIN_SCALE) * torch.tanh(F.softplus(a) - LN2)  # (B, 1) window side / image side
        t = F.relu(1 - s) * torch.tanh(b)                          # (B, 2) centre, inside the image
        zero = torch.zeros_like(s)
        return torch.stack([torch.cat([s, zero, t[:, :1]], 1), torch.cat([zero, s, t[:, 1:]], 1)], 1)  # (B, 2, 3)


class SpatialTransformer(nn.Module):
    """Samples the input on the grid of the predicted affine transform; same output size."""

    def __init__(self, identity_init: bool = False) -> None:
        super().__init__()
        self.localization = Localization()
        self.gamma = nn.Parameter(torch.zeros(())) if identity_init else None

    def forward(self, x: Tensor) -> Tensor:                        # (B, 3, H, W)
        theta = self.localization(x)                               # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2) in [-1, 1]
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.gamma is not None:
            return x + self.gamma * (sampled - x)
        return sampled                                             # (B, 3, H, W)
