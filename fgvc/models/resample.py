"""Resampling a window of a full-resolution image to the network input without aliasing.

Bilinear sampling (`grid_sample`) of a window wider than the output in source pixels skips pixels:
detail finer than the output's pixels folds into a moire instead of averaging out (a one-pixel
texture stays legible, unlike in the antialiased image the plain network reads). The mix below
treats the spatial transformer's windows and RA-CNN's zooms like a mipmap: with f = window side in
source pixels / output side and r = full image side / output side,

    V = (1 - w) * sharp + w * shrink(full),    w = clamp((f - 1) / (r - 1), 0, 1)

`sharp` is the window sampled bilinearly at the output size (pixel for pixel when f <= 1), `full`
the same window sampled at the full image's side and shrunk with the antialiased filter (the whole
image, f = r, is then exactly the plain network's input up to the grid's float rounding).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

SAMPLERS = ("bilinear", "antialias")  # the paper's bilinear grid, or mip_mix below (model.*.sampler keys)


def shrink(images: Tensor, side: int) -> Tensor:
    """The whole image at `side` x `side` (antialiased when shrinking); unchanged when it has that size."""
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def mip_mix(sharp: Tensor, full: Tensor, source_px: Tensor) -> Tensor:
    """`sharp` (B, C, S, S) and `full` (B, C, H, H): one window read at the output and at the full
    side; `source_px` (B,) its side in source pixels. Returns V (module docstring): (B, C, S, S)."""
    out, ratio = sharp.shape[-1], full.shape[-1] / sharp.shape[-1]
    w = ((source_px / out - 1) / (ratio - 1)).clamp(0, 1)[:, None, None, None]  # (B, 1, 1, 1)
    return sharp + w * (shrink(full, out) - sharp)
