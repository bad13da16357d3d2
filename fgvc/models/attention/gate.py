"""Attention gates (Oktay et al., "Attention U-Net", MIDL 2018; the classification form of
Schlemper et al., "Attention gated networks", Medical Image Analysis 2019).

A coarse, deep feature map g gates a shallower feature map x_l additively (Oktay eq. 1-2):

    q = psi^T relu(W_x^T x_i + W_g^T g_i + b_g) + b_psi,    alpha_i = sigmoid(q_i)

with g resampled (bilinear) to x's grid. For classification (Schlemper sec. 3.2) each gated stage is
pooled with its attention, x_hat_l = mean_i alpha_i x_i (B, C_l), and the prediction aggregates the
gated stages with the global feature: logits = fc(pool(g)) + sum_l fc_l(x_hat_l), which is a single
linear layer over the concatenation [pool(g); x_hat_1; ...] written as a sum. Zero-initialised
fc_l (`identity_init`) leave the plain network's logits exactly unchanged at the start.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

GATE_INTER_DIVISOR = 2  # W_x, W_g map to C_l / 2 channels (Oktay's choice of F_int)


class AttentionGate(nn.Module):
    """alpha = sigmoid(psi(relu(W_x x + W_g g))): (B, C_l, H, W), (B, C_g, h, w) -> (B, 1, H, W)."""

    def __init__(self, x_channels: int, g_channels: int) -> None:
        super().__init__()
        inter = max(1, x_channels // GATE_INTER_DIVISOR)
        self.theta = nn.Conv2d(x_channels, inter, 1, bias=False)   # W_x
        self.phi = nn.Conv2d(g_channels, inter, 1, bias=True)      # W_g, b_g
        self.psi = nn.Conv2d(inter, 1, 1, bias=True)               # psi, b_psi

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        g_on_x = F.interpolate(self.phi(g), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.psi(F.relu(self.theta(x) + g_on_x)).sigmoid()  # (B, 1, H, W)


class GatedStage(nn.Module):
    """One gated stage: its attention gate and its linear classifier on the attention-pooled features."""

    def __init__(self, x_channels: int, g_channels: int, num_classes: int, identity_init: bool = False) -> None:
        super().__init__()
        self.gate = AttentionGate(x_channels, g_channels)
        self.fc = nn.Linear(x_channels, num_classes)
        if identity_init:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:            # (B, C_l, H, W), (B, C_g, h, w)
        alpha = self.gate(x, g)                                   # (B, 1, H, W)
        pooled = (alpha * x).mean((2, 3))                         # (B, C_l)
        return self.fc(pooled)                                    # (B, num_classes)
