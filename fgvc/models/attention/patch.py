"""Putting attention blocks into any timm CNN without touching its weights.

Two placements (recipe key `model.attention.placement`):

- `stage`: after a whole stage. Stages are the entries of timm's `model.feature_info` (for ResNets
  entry 0 is the stem, 1-4 are layer1-4; negative indices count from the deepest). The block lives
  outside the backbone, in the caller's container, and runs on the stage's output through a forward
  hook on the stage module: every backbone parameter keeps its name, so pretrained and plain
  checkpoints load unchanged.
- `block`: inside every residual block of the chosen stages, in the block's attention slot (`se`):
  timm's ResNet/ResNeXt (`BasicBlock`, `Bottleneck`, where `block_args=dict(attn_layer=...)` would put
  it), EfficientNet/MobileNet (`se_layer`'s slot) and RegNet. An empty slot receives the new block; a
  slot that already holds the family's own SE keeps it, and the new block runs after it (a hook), so
  the pretrained SE is kept too. Other families raise a UserError.

Blocks that read the trunk's input as well as its output (residual attention, `reads_input`) get the
stage module's input from the forward hook, or the residual block's input from a forward pre-hook.

Default stages (`default_stages`, when the recipe names no stages): every stage from stride 4 on for
SE, CBAM and timm's blocks (the papers put them in every residual block; the stem is left alone), all
of those but the deepest for residual attention (the paper's modules sit at 56, 28 and 14 px of a
224-px input, none after the last stage), the two before the deepest for attention gates (the
deepest is their gating signal; AG-Sononet gates two stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import timm
import timm.layers
import torch
from timm.models import _efficientnet_blocks as effnet_blocks
from timm.models import regnet, resnet
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.attention.cbam import CBAM
from fgvc.models.attention.common import IdentityStart
from fgvc.models.attention.options import BlockOptions
from fgvc.models.attention.residual import ResidualAttention
from fgvc.models.attention.se import SqueezeExcite
from fgvc.models.choices import TIMM_ATTENTION

CLASSIFIER_LEVEL = ("gate", "stn")  # built by the classifier itself (gates need two stages, STN the image)
TIMM_PREFIX = "timm_"  # `timm_cbam` = timm's own CbamModule, for comparisons with fgvc's `cbam`
TIMM_NAMES = TIMM_ATTENTION  # timm.layers.get_attn's same-shape modules (the recipe's choices)
PROBE_SIDE = 64  # image side of the one probe forward that checks the stage modules output (B, C, H, W)
MIN_AUTO_REDUCTION = 4  # default stages start at stride 4: the papers' blocks sit in residual stages, not the stem
GATED_STAGES = 2  # attention gates by default gate the two stages before the deepest (AG-Sononet)

# Residual blocks with an attention slot `se`, and the channels the slot sees.
SLOT_CHANNELS: tuple[tuple[type, Callable[[nn.Module], int]], ...] = (
    (resnet.BasicBlock, lambda b: b.bn2.num_features),
    (resnet.Bottleneck, lambda b: b.bn3.num_features),
    (effnet_blocks.InvertedResidual, lambda b: b.bn2.num_features),
    (effnet_blocks.DepthwiseSeparableConv, lambda b: b.bn1.num_features),
    (effnet_blocks.EdgeResidual, lambda b: b.bn1.num_features),
    (regnet.Bottleneck, lambda b: b.conv2.bn.num_features),
)
SLOT = "se"
ADDED_AFTER_SLOT = "attn"  # name of a block added after an occupied slot


@dataclass
class Stage:
    index: int  # position in feature_info, >= 0
    module: str  # its module path in the backbone
    channels: int
    reduction: int  # input pixels per feature-map cell
    in_channels: int = 0  # channels of the stage module's input (0: unknown)
    in_reduction: int = 0  # input pixels per cell of the stage module's input (0: unknown)


class RunAfter:
    """Forward hook that replaces a module's output y by block(y), or by block(y, x) with `with_input`
    (x the module's input, for blocks that read the trunk's input too). `channels_last`: the stage
    gives (B, H, W, C) maps (Swin, `fmaps.layout`), which the block reads as (B, C, H, W)."""

    def __init__(self, block: nn.Module, with_input: bool = False, channels_last: bool = False) -> None:
        self.block = block
        self.with_input = with_input
        self.channels_last = channels_last

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self.channels_last:  # (B, H, W, C) -> (B, C, H, W) for the block, and back
            x = args[0].permute(0, 3, 1, 2) if self.with_input else None
            y = self.block(output.permute(0, 3, 1, 2), x) if self.with_input else self.block(output.permute(0, 3, 1, 2))
            return y.permute(0, 2, 3, 1)
        if self.with_input:
            return self.block(output, args[0])
        return self.block(output)


class HandInput:
    """Forward pre-hook on a residual block: gives its input x to the attention block in its slot."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.block.remember_input(args[0])


def probe_shapes(net: nn.Module, modules: list[nn.Module], side: int = PROBE_SIDE) -> list[tuple[tuple, tuple]]:
    """(input shape, output shape) of each module in one eval forward of a `side`-px image (a
    transformer's: the side it is built for); () where the module did not run or gave something
    other than one tensor."""
    inputs: dict[int, tuple] = {}
    outputs: dict[int, tuple] = {}

    def remember(i: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            first = args[0] if args else None
            inputs[i] = tuple(first.shape) if isinstance(first, Tensor) else ()
            outputs[i] = tuple(output.shape) if isinstance(output, Tensor) else ()
        return hook

    handles = [m.register_forward_hook(remember(i)) for i, m in enumerate(modules)]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            net.forward_features(torch.zeros(1, 3, side, side))
    except Exception:  # fixed-size transformers and the like
        inputs.clear(), outputs.clear()
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return [(inputs.get(i, ()), outputs.get(i, ())) for i in range(len(modules))]


def map_reduction(shape: tuple, side: int = PROBE_SIDE, channels_last: bool = False) -> int:
    """Input pixels per cell of a probed (B, C, H, W) map ((B, H, W, C) when `channels_last`) of a `side`-px image."""
    return max(1, round(side / shape[-2 if channels_last else -1]))


def backbone_stages(net: nn.Module, backbone: str, side: int = PROBE_SIDE) -> list[Stage]:
    """The backbone's feature levels, checked with one probe forward (a `side`-px image) to be spatial
    maps: (B, C, H, W), or (B, H, W, C) for backbones whose layout is NHWC (Swin: the one owner of
    feature maps, fgvc/models/features.py, says which; `attach_after_stage` turns them around).
    A ViT-family backbone (a token sequence, no stages) is one sentence naming what to use instead."""
    if fmaps.layout(net) == fmaps.NLC:
        raise UserError(f"backbone '{backbone}' is a plain vision transformer: its blocks pass a token sequence, with no "
                        "spatial stage maps for attention blocks; use model.attention.type=none (its self-attention is "
                        "the attention; localize.py draws its rollout and class-token maps), or a backbone with stages "
                        "(Swin, MaxViT, CoAtNet, or a CNN such as resnet50).")
    info = getattr(net, "feature_info", None)
    if not info or not hasattr(net, "forward_intermediates"):
        raise UserError(f"backbone '{backbone}' has no timm feature_info; pick a timm CNN (resnet50, convnext_tiny, ...).")
    stages = [Stage(i, f["module"], f["num_chs"], f["reduction"]) for i, f in enumerate(info)]
    shapes = probe_shapes(net, [net.get_submodule(s.module) for s in stages], side)
    last = channels_last(net)
    # the stage modules themselves must output spatial maps with the stage's channels
    if any(len(out) != 4 or out[-1 if last else 1] != s.channels for s, (_, out) in zip(stages, shapes)):
        raise UserError(f"backbone '{backbone}' does not give (B, C, H, W) stage maps; attention needs a CNN "
                        "(resnet, resnext, convnext, efficientnet, regnet, ...) or a Swin, MaxViT or CoAtNet.")
    for stage, (inp, _) in zip(stages, shapes):
        if len(inp) == 4:
            stage.in_channels, stage.in_reduction = inp[-1 if last else 1], map_reduction(inp, side, last)
    return stages


def channels_last(net: nn.Module) -> bool:
    """Whether the backbone's stage maps are (B, H, W, C) (Swin), from the one owner of feature maps."""
    return fmaps.layout(net) == fmaps.NHWC


def pick_stages(stages: list[Stage], indices: list[int], backbone: str) -> list[Stage]:
    n, picked = len(stages), []
    for i in indices:
        if not -n <= i < n:
            raise UserError(f"model.attention.stages has {i} but backbone '{backbone}' has stages 0..{n - 1} "
                            f"({', '.join(s.module for s in stages)}); negative indices count from the last.")
        if stages[i % n] not in picked:
            picked.append(stages[i % n])
    return picked


def default_stages(kind: str, stages: list[Stage]) -> list[Stage]:
    """The stages a method takes when the recipe names none (see the module docstring for why)."""
    body = [s for s in stages if s.reduction >= MIN_AUTO_REDUCTION] or stages
    if kind == "gate":
        return body[:-1][-GATED_STAGES:]
    if kind == "residual":
        return body[:-1] or body
    return body


def make_block(kind: str, channels: int, feature_side: int, reduction: int = 16, kernel_size: int = 7,
               identity_init: bool = False, inplace: bool = False, options: BlockOptions | None = None,
               in_channels: int | None = None, in_side: int | None = None) -> nn.Module:
    """One attention block for a (B, channels, side, side) map that returns a map of the same shape.

    `inplace`: the block's input is its own (a residual block's attention slot, see `attach_in_blocks`),
    so fgvc's SE and CBAM may write their output into it in inference. `in_channels`, `in_side`: the
    trunk's input, which residual attention's mask reads (default: the map's own)."""
    o = options or BlockOptions()
    if kind == "se":
        return SqueezeExcite(channels, reduction, bias=o.mlp_bias, identity_init=identity_init, inplace=inplace)
    if kind == "cbam":
        return CBAM(channels, reduction, kernel_size, mlp_bias=o.mlp_bias, spatial_order=o.spatial_order,
                    spatial_norm=o.spatial_norm, spatial_bn_momentum=o.spatial_bn_momentum,
                    spatial_bn_zero_init=o.spatial_bn_zero_init, identity_init=identity_init, inplace=inplace)
    if kind == "residual":
        side = (in_side or feature_side) if o.residual_form == "paper" else feature_side  # of the map M reads
        return ResidualAttention(channels, side, identity_init=identity_init, in_channels=in_channels,
                                 form=o.residual_form)
    name = kind.removeprefix(TIMM_PREFIX)
    if name not in TIMM_NAMES:
        what = ("is built by the classifier, not inside a stage or block" if kind in CLASSIFIER_LEVEL
                else "is unknown; see fgvc.config.ATTENTION_TYPES")
        raise UserError(f"model.attention.type '{kind}' {what}.")
    block = timm.layers.create_attn(name, channels)
    return IdentityStart(block) if identity_init else block


def attach_after_stage(net: nn.Module, stage: Stage, block: nn.Module) -> None:
    """Run `block` on the output of the stage module (the block must be registered by the caller); a
    Swin stage's (B, H, W, C) map is given to the block as (B, C, H, W) and its output turned back."""
    with_input = getattr(block, "reads_input", False)
    net.get_submodule(stage.module).register_forward_hook(RunAfter(block, with_input, channels_last(net)))


def residual_blocks(net: nn.Module, stage: Stage) -> list[tuple[nn.Module, int]]:
    """(block, slot channels) of every residual block with an attention slot in this stage."""
    found = []
    for module in net.get_submodule(stage.module).modules():
        for cls, channels in SLOT_CHANNELS:
            if isinstance(module, cls):
                found.append((module, channels(module)))
                break
    return found


def attach_in_blocks(net: nn.Module, stage: Stage, backbone: str,
                     make: Callable[[int, int, int], nn.Module], side: int = PROBE_SIDE) -> list[nn.Module]:
    """Put `make(channels, in_channels, in_reduction)` into the attention slot of every residual block of
    `stage` (`in_*`: the residual block's input, from one probe forward); returns the new blocks.

    What reaches a slot is a fresh tensor that only the slot reads (the output of the block's last
    norm/activation, or of the family's own SE), so the new block may overwrite it in inference."""
    blocks = residual_blocks(net, stage)
    if not blocks:
        raise UserError(f"model.attention.placement=block needs residual blocks with an attention slot (timm ResNet/"
                        f"ResNeXt, EfficientNet/MobileNet, RegNet), but stage {stage.index} ({stage.module}) of "
                        f"'{backbone}' has none; use model.attention.placement=stage or other stages.")
    shapes = probe_shapes(net, [block for block, _ in blocks], side)
    added = []
    for (block, channels), (inp, _) in zip(blocks, shapes):
        in_channels, in_reduction = (inp[1], map_reduction(inp, side)) if len(inp) == 4 else (channels, stage.reduction)
        new = make(channels, in_channels, in_reduction)
        slot = getattr(block, SLOT, None)
        if slot is None or isinstance(slot, nn.Identity):
            setattr(block, SLOT, new)
        else:  # keep the family's own (pretrained) SE and run the new block after it
            block.add_module(ADDED_AFTER_SLOT, new)
            slot.register_forward_hook(RunAfter(new))
        if getattr(new, "reads_input", False):
            block.register_forward_pre_hook(HandInput(new))
        added.append(new)
    return added
