"""The backbone families fgvc supports, as tiny timm models for the family x feature matrix
(tests/test_backbones.py, `python fgvc/benchmark.py backbones` -> results/backbones.md).

Each family is one timm architecture built with pretrained=False and small keyword arguments (one or
two blocks, 32-64 channels, 56-64 px inputs), so a whole training step runs in a fraction of a second
on a CPU. The real sizes differ only in depth, width and input side: the code paths are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_VIT = dict(depth=2, embed_dim=32, num_heads=2)
_SWIN = dict(window_size=4, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


@dataclass(frozen=True)
class Family:
    name: str  # as the matrix shows it
    backbone: str  # timm architecture
    args: dict[str, Any] = field(default_factory=dict)  # tiny create_model keyword arguments
    side: int = 64  # input side in pixels the tiny model is built for
    vit: bool = False  # a ViT family: prefix tokens and attention matrices (rollout, class-token attention)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("ResNet", "test_resnet"),
    Family("ResNeXt", "resnext50_32x4d", dict(layers=(1, 1, 1, 1))),
    Family("ConvNeXt", "test_convnext"),
    Family("EfficientNet", "test_efficientnet"),
    Family("MobileNetV3", "mobilenetv3_small_050"),
    Family("RegNet", "regnetx_002"),
    Family("ViT", "vit_tiny_patch16_224", dict(img_size=64, **_VIT), vit=True),
    Family("DeiT distilled", "deit_tiny_distilled_patch16_224", dict(img_size=64, **_VIT), vit=True),
    Family("ViT registers", "vit_small_patch14_reg4_dinov2", dict(img_size=56, **_VIT), side=56, vit=True),
    Family("Swin v1", "swin_tiny_patch4_window7_224", dict(img_size=64, **_SWIN)),
    Family("Swin v2", "swinv2_tiny_window8_256", dict(img_size=64, **_SWIN)),
    Family("EVA-02", "eva02_tiny_patch14_224", dict(img_size=56, **_VIT), side=56, vit=True),
)}
