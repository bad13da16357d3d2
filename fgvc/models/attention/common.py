"""What every fgvc attention block shares: how a gate is applied, with an optional identity start.

The papers apply a gate by multiplication, `y = x * a`. Put into a pretrained network that changes
its output from the first step. With `identity_init=True` a block instead computes

    y = x * (1 + gamma * (a - 1)),    gamma a learnable scalar, 0 at initialisation,

which is exactly `x` at initialisation (1 + 0 * (a - 1) == 1 in floating point) and exactly the
paper's `x * a` at gamma = 1. The gate `a` itself (what the recorder shows) is the paper's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def make_gamma(identity_init: bool) -> nn.Parameter | None:
    """The blend scalar of an identity start, or None for the paper's plain multiplication."""
    return nn.Parameter(torch.zeros(())) if identity_init else None


def apply_gate(x: Tensor, gate: Tensor, gamma: Tensor | None, inplace: bool = False) -> Tensor:
    """x * gate (the paper), or x * (1 + gamma * (gate - 1)) for an identity start.

    `inplace`: the caller owns `x` and nothing else reads it later, so without autograd (inference)
    the product is written into `x`. On the CPU a fresh full-size output costs as much as the
    multiplication itself (allocation and first-touch page faults); with autograd on it never applies.
    """
    if gamma is not None:
        gate = 1 + gamma * (gate - 1)  # on the small gate tensor; exactly 1 at gamma = 0
    if inplace and not torch.is_grad_enabled():
        return x.mul_(gate)
    return x * gate


class IdentityStart(nn.Module):
    """Wraps any same-shape block f (e.g. one of timm's): y = x + gamma * (f(x) - x), gamma = 0 at init."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * (self.block(x) - x)
