"""Spatial transformer (Jaderberg et al., "Spatial Transformer Networks", NIPS 2015).

A localisation network predicts a transform theta (B, 2, 3) of the input (sec. 3.1); the sampling
grid T_theta(G) (eq. 1) is sampled bilinearly (eq. 5) to give the backbone's input. As in the
paper's CUB experiments (sec. 4.3), the transform is an *attention* transform, scale and
translation only:

    theta = [[s, 0, tx], [0, s, ty]],  s = 1 - (1 - MIN_SCALE) * tanh(softplus(a) - ln 2),
    tx, ty = relu(1 - s) * tanh(bx, by)

so the window always keeps its aspect, never shrinks below MIN_SCALE of the image, never grows
beyond a bounded zoom-out (none with `crop_only`: s cut at 1), and (when it zooms in) stays inside
the image. The raw outputs (a, bx, by) start at zero, which is exactly the identity transform: the
network starts by looking at the whole image. At the identity the translation has no gradient
(t = relu(1 - s) * tanh(b) with s = 1), so the window can move only after it has shrunk; with
`start_scale` < 1 the transformer starts at a centred window of that side (a's bias set so that s =
start_scale, bx = by = 0), whose position gets gradients from the first step; with `fixed_scale`
the side stays start_scale and only the position is learned (a translation-only attention window).
An unbounded affine regression trained from scratch at the recipes' learning rates flew out of the
image within the first epoch and left the backbone a black input (measured: chance accuracy on the
synthetic set); the bounded form cannot.

Resolution (paper sec. 4.3, CUB): the transformers read a 448-px input and sample 224-px regions,
so a window smaller than the image keeps detail instead of only upsampling. Here the region is
sampled from the full-resolution image the data pipeline delivers (`data.full_resolution` times the
network input) at the network's input size `out_size`; the localisation network reads the image
shrunk to LOC_SIDE.

Parallel transformers (paper sec. 4.3: 2 or 4 on CUB): one localisation network predicts `count`
windows (B, N, 2, 3); each window is sampled and the classifier concatenates their features.

The identity grid reproduces the input only up to float rounding of the grid coordinates; with
`identity_init` the output is x_S + gamma * (sampled - x_S), gamma = 0 at initialisation, which is
exactly x_S, the input shrunk to `out_size` (x itself when it already has that size).

Sampler (`sampler`): "bilinear" is the paper's (eq. 5) at `out_size`: when the window is larger
than `out_size` source pixels it skips pixels (aliasing: a one-pixel texture becomes a legible
moire), and the localisation network gets no gradient while gamma is 0, so an identity-started
transformer that never leaves gamma = 0 stays the plain network (measured: gamma -0.03 and 0.02 at
the end of two synthetic runs). "antialias" is `fgvc.models.resample.mip_mix`: a window of at most
`out_size` source pixels is read pixel for pixel, the whole image is exactly x_S (the plain
network's antialiased input), so the transformer starts as the plain network without the gamma
blend and its window gets gradients from the first step; in between the two readings of the same
window are mixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models.resample import SAMPLERS, mip_mix, shrink

LOC_SIDE = 64  # the localisation network sees the image at 64x64: where to look needs no fine detail
LOC_WIDTHS = (16, 32, 64)  # channels of its three stride-2 convolutions
LOC_HIDDEN = 64  # width of its fully connected layer
MIN_SCALE = 0.35  # smallest window side, as a fraction of the image: below it too few pixels are resampled
LN2 = math.log(2.0)  # softplus(0): makes a = 0 the identity


def softplus_inverse(y: float) -> float:
    """a with softplus(a) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


class Localization(nn.Module):
    """f_loc: image (B, 3, H, W) -> `count` attention transforms theta (B, N, 2, 3), identity at initialisation.
    `crop_only`: the window's side is min(s, 1), never a zoom-out (the paper's CUB windows are crops of
    the image), with the gradient of s passed through the cut (straight-through), so a window pushed
    past the whole image still gets gradients and can come back; the same transform wherever s <= 1."""

    def __init__(self, in_channels: int = 3, count: int = 1, crop_only: bool = False, start_scale: float = 1.0,
                 fixed_scale: bool = False) -> None:
        super().__init__()
        if not MIN_SCALE < start_scale <= 1:
            raise UserError(f"model.attention.stn_start_scale is {start_scale}; use a window side above {MIN_SCALE} "
                            "and at most 1 (a fraction of the image).")
        if fixed_scale and start_scale == 1:
            raise UserError("model.attention.stn_fixed_scale is true with stn_start_scale 1: a window the size of "
                            "the image cannot move; set model.attention.stn_start_scale below 1.")
        self.count, self.crop_only = count, crop_only
        self.fixed_scale = start_scale if fixed_scale else None  # the side every window keeps
        layers, c = [], in_channels
        for width in LOC_WIDTHS:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(c, LOC_HIDDEN), nn.ReLU(inplace=True), nn.Linear(LOC_HIDDEN, 3 * count))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)
        with torch.no_grad():  # a's bias: s(a) = start_scale (a = 0 at start_scale 1: the identity)
            self.fc[-1].bias.view(count, 3)[:, 0] = softplus_inverse(math.atanh((1 - start_scale) / (1 - MIN_SCALE)) + LN2)

    def forward(self, x: Tensor) -> Tensor:                        # (B, 3, H, W)
        small = F.interpolate(x, size=(LOC_SIDE, LOC_SIDE), mode="bilinear", align_corners=False)
        raw = self.fc(self.features(small)).view(-1, self.count, 3)  # (B, N, 3)
        a, b = raw.split([1, 2], dim=2)                            # (B, N, 1), (B, N, 2)
        if self.fixed_scale is None:
            s = 1 - (1 - MIN_SCALE) * torch.tanh(F.softplus(a) - LN2)  # (B, N, 1) window side / image side
        else:
            s = torch.full_like(a, self.fixed_scale)               # (B, N, 1) translation only
        if self.crop_only:
            s = s - F.relu(s - 1).detach()                         # value min(s, 1), gradient of s
        t = F.relu(1 - s) * torch.tanh(b)                          # (B, N, 2) centre, inside the image
        zero = torch.zeros_like(s)
        rows = [torch.cat([s, zero, t[..., :1]], 2), torch.cat([zero, s, t[..., 1:]], 2)]  # (B, N, 3) each
        return torch.stack(rows, 2)                                # (B, N, 2, 3)


def sample_windows(images: Tensor, theta: Tensor, out_size: int) -> Tensor:
    """T_theta(G) sampled bilinearly (paper eq. 1, 5) from the full-resolution `images` (B, 3, H, W) for
    each of the N transforms theta (B, N, 2, 3): (B, N, 3, out_size, out_size)."""
    b, n = theta.shape[:2]
    grid = F.affine_grid(theta.flatten(0, 1), [b * n, images.shape[1], out_size, out_size],
                         align_corners=False)                      # (B*N, S, S, 2) in [-1, 1]
    source = images.repeat_interleave(n, dim=0) if n > 1 else images  # (B*N, 3, H, W)
    sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.view(b, n, *sampled.shape[1:])                  # (B, N, 3, S, S)


class SpatialTransformer(nn.Module):
    """`count` windows predicted from the image, each sampled from it at `out_size`: (B, N, 3, S, S)."""

    def __init__(self, out_size: int, count: int = 1, identity_init: bool = False, sampler: str = "bilinear",
                 crop_only: bool = False, start_scale: float = 1.0, fixed_scale: bool = False) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler is {sampler!r}; expected one of {SAMPLERS}")
        self.out_size, self.count, self.sampler = out_size, count, sampler
        self.localization = Localization(count=count, crop_only=crop_only, start_scale=start_scale,
                                         fixed_scale=fixed_scale)
        # the antialiased sampler starts at x_S by itself: no blend needed for an identity start
        self.gamma = nn.Parameter(torch.zeros(())) if identity_init and sampler == "bilinear" else None

    def forward(self, x: Tensor) -> Tensor:                        # (B, 3, H, W), H = W >= out_size
        theta = self.localization(x)                               # (B, N, 2, 3)
        sampled = sample_windows(x, theta, self.out_size)          # (B, N, 3, S, S)
        if self.sampler == "antialias" and x.shape[-1] > self.out_size:
            full = sample_windows(x, theta, x.shape[-1])           # (B, N, 3, H, H): every source pixel read
            source_px = theta[:, :, 0, 0].flatten() * x.shape[-1]  # (B*N,) window side in source pixels
            return mip_mix(sampled.flatten(0, 1), full.flatten(0, 1), source_px).view_as(sampled)
        if self.gamma is not None:
            whole = shrink(x, self.out_size)[:, None]              # (B, 1, 3, S, S)
            return whole + self.gamma * (sampled - whole)
        return sampled
