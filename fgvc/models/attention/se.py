"""Squeeze-and-Excitation (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

    s = sigmoid(W2 relu(W1 z + b1) + b2),   z = mean_{h,w} x      (eq. 2-3)
    y = s * x                                                     (eq. 4)

W1 is (C/r, C), W2 is (C, C/r): 2 C^2 / r weights plus C/r + C biases.
"""

from __future__ import annotations

from torch import Tensor, nn

from fgvc.models.attention.common import apply_gate, make_gamma


def reduced_width(channels: int, reduction: int, divisor: int = 1) -> int:
    """C / r, rounded to a multiple of `divisor` (timm's SEModule uses 8; the paper uses 1), at least 1."""
    width = max(1, int(channels / reduction))
    if divisor > 1:  # round to the nearest multiple, as timm's make_divisible(round_limit=0)
        width = max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)
    return width


class ChannelExcitation(nn.Module):
    """The excitation of eq. 3 on pooled features: (B, C) -> (B, C) channel weights in (0, 1)."""

    def __init__(self, channels: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def forward(self, z: Tensor) -> Tensor:                    # (B, C)
        return self.fc2(self.act(self.fc1(z))).sigmoid()       # (B, C)


class SqueezeExcite(nn.Module):
    """SE block: y = x * sigmoid(W2 relu(W1 mean_hw(x))). `divisor=8` matches timm's SEModule widths."""

    def __init__(self, channels: int, reduction: int = 16, bias: bool = True, divisor: int = 1,
                 identity_init: bool = False, inplace: bool = False) -> None:
        """`inplace`: in inference, write y into x (only where nothing else reads x, e.g. a residual
        block's attention slot; see `apply_gate`)."""
        super().__init__()
        self.excite = ChannelExcitation(channels, reduced_width(channels, reduction, divisor), bias)
        self.gamma = make_gamma(identity_init)
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:                    # (B, C, H, W)
        s = self.excite(x.mean((2, 3)))                        # (B, C)
        return apply_gate(x, s[:, :, None, None], self.gamma, self.inplace)  # (B, C, H, W)

    def load_timm(self, timm_se: nn.Module) -> None:
        """Copy the weights of timm's SEModule (1x1 convolutions) into this block's linear layers."""
        for ours, theirs in ((self.excite.fc1, timm_se.fc1), (self.excite.fc2, timm_se.fc2)):
            ours.weight.data.copy_(theirs.weight.data.flatten(1))
            if ours.bias is not None:
                ours.bias.data.copy_(theirs.bias.data)
