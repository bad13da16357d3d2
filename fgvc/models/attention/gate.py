"""Attention gates (Oktay et al., "Attention U-Net", MIDL 2018; the classification form of
Schlemper et al., "Attention gated networks", Medical Image Analysis 2019).

A coarse, deep feature map g gates a shallower feature map x_l additively (Oktay eq. 1-2):

    q = psi^T relu(W_x^T x_i + W_g^T g_i + b_g) + b_psi,    alpha_i = sigmoid(q_i)

with g resampled (bilinear) to x's grid. For classification (Schlemper sec. 3.2) each gated stage is
pooled with its attention into x_hat_l (B, C_l), and the prediction aggregates the gated stages with
the global feature: logits = fc(pool(g)) + sum_l fc_l(x_hat_l), which is a single linear layer over
the concatenation [pool(g); x_hat_1; ...] written as a sum. Zero-initialised fc_l (`identity_init`)
leave the plain network's logits exactly unchanged at the start.

Two normalisations of the coefficients (`norm`):
- `sigmoid` (default; Oktay eq. 2): alpha_i = sigmoid(q_i), x_hat = mean_i alpha_i x_i;
- `sum_one`: the configurations shipped with the authors' classification network AG-Sononet
  (`concatenation_mean_flow`): alpha_i = (q_i - min_j q_j) / sum_k (q_k - min_j q_j), which sums to one
  over positions, and x_hat = sum_i alpha_i x_i, an attention-weighted average.
The inner width F_int of W_x, W_g (`width`): `gating`, the gating stage's channels C_g, as the
authors' AG-Sononet (inter_channels = the gating filters; default), or `half`, C_l / 2.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

GATE_NORMS = ("sigmoid", "sum_one")
GATE_WIDTHS = ("gating", "half")
HALF = 2  # `half`: W_x, W_g map to C_l / 2 channels (Oktay's U-Net choice of F_int)
NORM_EPS = 1e-6  # `sum_one`: equal scores (e.g. a 1x1 map) give alpha = 1/N instead of 0/0


def normalise_sum_one(q: Tensor) -> Tensor:
    """AG-Sononet's alpha: scores shifted to a minimum of 0, divided by their sum over positions."""
    shifted = q - q.amin((2, 3), keepdim=True) + NORM_EPS                 # (B, 1, H, W), >= eps
    return shifted / shifted.sum((2, 3), keepdim=True)                   # (B, 1, H, W), sums to 1


class AttentionGate(nn.Module):
    """alpha = norm(psi(relu(W_x x + W_g g))): (B, C_l, H, W), (B, C_g, h, w) -> (B, 1, H, W)."""

    def __init__(self, x_channels: int, g_channels: int, norm: str = "sigmoid", width: str = "gating") -> None:
        super().__init__()
        if norm not in GATE_NORMS or width not in GATE_WIDTHS:
            raise ValueError(f"gate norm must be one of {GATE_NORMS} and width one of {GATE_WIDTHS}")
        self.norm = norm
        inter = g_channels if width == "gating" else max(1, x_channels // HALF)
        self.theta = nn.Conv2d(x_channels, inter, 1, bias=False)   # W_x
        self.phi = nn.Conv2d(g_channels, inter, 1, bias=True)      # W_g, b_g
        self.psi = nn.Conv2d(inter, 1, 1, bias=True)               # psi, b_psi

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        g_on_x = F.interpolate(self.phi(g), size=x.shape[-2:], mode="bilinear", align_corners=False)
        q = self.psi(F.relu(self.theta(x) + g_on_x))               # (B, 1, H, W)
        return q.sigmoid() if self.norm == "sigmoid" else normalise_sum_one(q)


class GatedStage(nn.Module):
    """One gated stage: its attention gate and its linear classifier on the attention-pooled features."""

    def __init__(self, x_channels: int, g_channels: int, num_classes: int, identity_init: bool = False,
                 norm: str = "sigmoid", width: str = "gating") -> None:
        super().__init__()
        self.gate = AttentionGate(x_channels, g_channels, norm, width)
        self.fc = nn.Linear(x_channels, num_classes)
        if identity_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:            # (B, C_l, H, W), (B, C_g, h, w)
        alpha = self.gate(x, g)                                   # (B, 1, H, W)
        gated = alpha * x                                         # (B, C_l, H, W)
        pooled = gated.mean((2, 3)) if self.gate.norm == "sigmoid" else gated.sum((2, 3))  # (B, C_l)
        return self.fc(pooled)                                    # (B, num_classes)
