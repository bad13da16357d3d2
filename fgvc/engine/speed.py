"""The speed and memory switches timm's train.py offers, for any fgvc model:

- `train.channels_last`: parameters and inputs in channels-last memory format (NHWC), which
  tensor-core convolutions on current GPUs run fastest in;
- `train.compile`: `torch.compile` of the model, in place (`nn.Module.compile`), so parameter
  names, checkpoints and weights files do not change;
- `train.grad_checkpointing`: timm's `set_grad_checkpointing` on every timm network inside the
  model: activations of the backbone's stages are recomputed in the backward pass instead of kept,
  which is what lets 448-px ResNet-50s (RA-CNN has three) and ViTs train with a useful batch on one GPU.
  Supported by timm's ResNet/ResNeXt, ConvNeXt, EfficientNet/MobileNet, RegNet, ViT, DeiT, Swin,
  EVA and most other families; a model without any such network stops with one sentence.

None of them changes what the model computes (tested: outputs and gradients equal the plain path).
"""

from __future__ import annotations

import torch
from torch import nn

from fgvc.errors import UserError


def timm_networks(model: nn.Module) -> list[nn.Module]:
    """The outermost timm networks inside `model` that can checkpoint their stages."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if module is model or not hasattr(module, "set_grad_checkpointing"):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return [m for _, m in found]


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def apply_speed_switches(model: nn.Module, channels_last: bool = False, compile: bool = False,
                         grad_checkpointing: bool = False) -> nn.Module:
    """Turn the switches on (in place); returns the model."""
    if grad_checkpointing:
        nets = timm_networks(model)
        enabled = 0
        for net in nets:
            try:
                net.set_grad_checkpointing(True)
                enabled += 1
            except (AssertionError, NotImplementedError):  # timm's way of saying "not for this one"
                continue
        if not enabled:
            raise UserError(f"train.grad_checkpointing: no timm network in this {type(model).__name__} supports "
                            "gradient checkpointing; set train.grad_checkpointing=false.")
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_channels_last_input)
    if compile:
        model.compile()
    return model
