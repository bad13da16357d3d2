"""Recording what every attention gate does, with forward hooks and no change to the model
(the way vit-pytorch records attention maps).

    with AttentionRecorder(model) as recorder:
        model(images)
    for r in recorder.records:        # r.kind, r.stage, r.stride, r.value
        ...

Kinds: `channel` (B, C) channel weights (SE, CBAM's M_c); `spatial` (B, 1, H, W) maps (CBAM's M_s,
attention-gate coefficients alpha, and the channel mean of a residual-attention mask); `mask`
(B, C, H, W) residual-attention soft masks; `grid` (B, N, H, W, 2) the spatial transformers' sampling
grids over the input in [-1, 1] image coordinates, and `theta` (B, N, 2, 3) their affine transforms. `stage` is the
backbone stage (feature_info index; -1 before the backbone) and `stride` the input pixels per map
cell. timm's own attention blocks are not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.models.attention.cbam import ChannelGate, SpatialGate
from fgvc.models.attention.gate import AttentionGate
from fgvc.models.attention.residual import SoftMask
from fgvc.models.attention.se import ChannelExcitation
from fgvc.models.attention.stn import Localization

BEFORE_BACKBONE = -1  # the stage of the spatial transformer, which acts on the image


@dataclass
class GateRecord:
    site: str  # module path of the gate in the model, e.g. "net.layer3.1.se.spatial"
    kind: str  # channel | spatial | mask | grid | theta
    stage: int  # backbone stage (feature_info index), -1 before the backbone
    stride: int  # input-image pixels per map cell (1 for channel weights and STN records)
    value: Tensor  # detached; shapes in the module docstring


class AttentionRecorder:
    """Context manager that hooks every fgvc gate of `model`; `records` fills on each forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: list[GateRecord] = []
        self._handles: list = []
        self._input_side = 0

    def __enter__(self) -> "AttentionRecorder":
        self._handles.append(self.model.register_forward_pre_hook(self._remember_input))
        for name, module in self.model.named_modules():
            if isinstance(module, (ChannelExcitation, ChannelGate, SpatialGate, SoftMask, AttentionGate, Localization)):
                self._handles.append(module.register_forward_hook(self._hook(name, self._stage_of(name))))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stage_of(self, name: str) -> int:
        """The fgvc_stage of the nearest enclosing attention block, -1 for none (the STN)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            module = self.model.get_submodule(".".join(parts[:end]))
            if hasattr(module, "fgvc_stage"):
                return module.fgvc_stage
        return BEFORE_BACKBONE

    def _remember_input(self, module: nn.Module, args: tuple) -> None:
        self._input_side = args[0].shape[-1]

    def _stride(self, value: Tensor) -> int:
        return max(1, round(self._input_side / value.shape[-1])) if self._input_side else 1

    def _hook(self, name: str, stage: int):
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            out = output.detach()
            if isinstance(module, (ChannelExcitation, ChannelGate)):
                self.records.append(GateRecord(name, "channel", stage, 1, out))
            elif isinstance(module, (SpatialGate, AttentionGate)):
                self.records.append(GateRecord(name, "spatial", stage, self._stride(out), out))
            elif isinstance(module, SoftMask):
                stride = self._stride(out)
                self.records.append(GateRecord(name, "mask", stage, stride, out))
                self.records.append(GateRecord(name, "spatial", stage, stride, out.mean(1, keepdim=True)))
            elif isinstance(module, Localization):
                image = args[0]
                b, n = out.shape[:2]
                grid = F.affine_grid(out.flatten(0, 1), [b * n, *image.shape[1:]], align_corners=False)
                grid = grid.view(b, n, *grid.shape[1:])  # (B, N, H, W, 2)
                self.records.append(GateRecord(name, "theta", BEFORE_BACKBONE, 1, out))
                self.records.append(GateRecord(name, "grid", BEFORE_BACKBONE, 1, grid))
        return record
