"""The per-method options of fgvc's attention blocks, as plain typed values (the builder in
fgvc/models/build.py fills them from the recipe's `model.attention.*`; the defaults are the papers'
or their authors' code's, see each block's docstring)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockOptions:
    mlp_bias: bool = True  # SE, CBAM: biases in the channel MLP (both papers' code)
    spatial_order: str = "max_mean"  # CBAM: [max; mean] over channels (authors' code) or mean_max (timm)
    spatial_norm: bool = True  # CBAM: batch norm after the 7x7 convolution
    spatial_bn_momentum: float = 0.1  # CBAM: that batch norm's momentum (PyTorch's; the authors' code 0.01)
    spatial_bn_zero_init: bool = False  # CBAM: zero-initialise that batch norm's weight (the authors' ResNet)
    residual_form: str = "paper"  # residual attention: (1 + M(x)) * T(x); "output_mask": (1 + M(T)) * T
    gate_norm: str = "sigmoid"  # attention gates: sigmoid, mean-pooled; "sum_one": AG-Sononet's, summed
    gate_width: str = "gating"  # attention gates' inner width: the gating stage's (reference) or "half" C_l / 2
