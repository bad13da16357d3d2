"""Spatial transformer (Jaderberg et al., "Spatial Transformer Networks", NIPS 2015).

A localisation network predicts an affine transform theta (B, 2, 3) of the input (sec. 3.1); the
sampling grid T_theta(G) (eq. 1) is sampled bilinearly (eq. 5) to give the backbone's input. The
final regression layer starts at zero weights and the identity transform as bias, as in the paper,
so the network starts by looking at the whole image.

The identity grid reproduces the input only up to float rounding of the grid coordinates; with
`identity_init` the output is x + gamma * (sampled - x), gamma = 0 at initialisation, which is exactly x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOC_SIDE = 64  # the localisation network sees the image at 64x64: where to look needs no fine detail
LOC_WIDTHS = (16, 32, 64)  # channels of its three stride-2 convolutions
LOC_HIDDEN = 64  # width of its fully connected layer
IDENTITY_AFFINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class Localization(nn.Module):
    """f_loc: image (B, 3, H, W) -> affine theta (B, 2, 3), identity at initialisation."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        layers, c = [], in_channels
        for width in LOC_WIDTHS:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c, LOC_HIDDEN), nn.ReLU(inplace=True), nn.Linear(LOC_HIDDEN, 6))
        nn.init.zeros_(self.fc[-1].weight)
        with torch.no_grad():
            self.fc[-1].bias.copy_(torch.tensor(IDENTITY_AFFINE))

    def forward(self, x: Tensor) -> Tensor:                        # (B, 3, H, W)
        small = F.interpolate(x, size=(LOC_SIDE, LOC_SIDE), mode="bilinear", align_corners=False)
        return self.fc(self.features(small)).view(-1, 2, 3)       # (B, 2, 3)


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
