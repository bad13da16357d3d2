"""The one owner of spatial feature maps: (B, C, H, W) from any timm backbone, CNN or transformer.

Every architecture, map, report and tool reads a backbone's feature maps through this module.

timm backbones return their last features (`forward_features`) in one of three layouts:

    NCHW   CNNs (ResNet/ResNeXt, ConvNeXt, EfficientNet/MobileNet, RegNet, MaxViT/CoAtNet, ...)
    NHWC   Swin v1/v2 (`model.output_fmt == "NHWC"`)
    NLC    ViT-like token sequences (ViT, DeiT, EVA-02, BEiT, ...): `num_prefix_tokens` prefix tokens
           (class, distillation, register tokens, in that order) first, then the patch tokens row-major

`spatial_features(net, x)` runs `forward_features` once and returns `SpatialFeatures`: `.native`,
the output the backbone's own head reads (`net.forward_head(feats.native)` are the backbone's logits,
unchanged), and, computed on first use, `.map` (B, C, h, w) and `.prefix` (B, P, C), the prefix
tokens kept apart (None without them). A backbone whose output has no grid (an MLP-Mixer) still
trains through `.native`; asking for its `.map` stops with one sentence. The map is a reshape
of the native output (a view in the same autograd graph, so gradients of the logits reach it); for
NCHW backbones it IS the native output, exactly the map fgvc read before. For the token and NHWC
layouts it equals timm's own `forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW")`
(tests/test_features.py); deeper levels come from that timm call directly (`intermediate_maps`).

The head relation (for class activation maps): `head_relation(net, classifier)` says how the pooled
features become logits, `class_activation_maps(feats, head)` applies it at every position:

    avg     (CNNs, Swin, ViT/EVA with global_pool="avg"): logits = W norm(mean_p f(p)) + b. Without a
            norm after the pool, CAM M_k(p) = w_k . f(p) + b_k (Zhou et al. 2016); with a LayerNorm
            after the pool (ViT's fc_norm, ConvNeXt's head norm) every position is normalised with the
            pooled vector's mean and variance, an affine map per image, so the CAM still averages
            exactly to the logits.
    token   (ViT/DeiT with global_pool="token"): the head reads the class token (DeiT distilled: the
            mean of the class and distillation heads). The class-specific map applies that head to
            every patch token, M_k(p) = w_k . f(p) + b_k; it does not average to the logits (the class
            token is not a mean of the patch tokens). The class token's attention is class-agnostic;
            this map is not.

Heads with a hidden layer after the pool (MobileNetV3's conv_head, an MLP head) have no linear
relation: `head_relation` stops with one sentence pointing to Grad-CAM.

For hooks (Grad-CAM): `gradient_module(net, x)` is the module whose output Grad-CAM reads and
`to_map(net, output, image_size).map` turns that output into the map. `pooled_width(net)` is the
width of the pooled vector a classifier on `forward_head(..., pre_logits=True)` reads. Attention
matrices of the ViT families: fgvc/models/token_attention.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch
from torch import Tensor, nn

from fgvc.errors import UserError

NCHW, NHWC, NLC = "NCHW", "NHWC", "NLC"
AVG, TOKEN = "avg", "token"  # how a head pools: mean over positions, or the class token(s)
AVG_POOLS = ("avg", "fast", "fastavg")  # timm pool_type names of a plain global average
CAM_CHECK_TOLERANCE = 1e-3  # relative: an avg-pool CAM must average back to the logits it explains


class SpatialFeatures:
    """A backbone's last features: `native` as forward_features returned it, and (computed on first
    use, so that a head reading only `native` never needs a grid) `map` and `prefix`."""

    def __init__(self, net: nn.Module, native: Tensor, image_size: tuple[int, int] | None = None) -> None:
        self.net, self.image_size = net, image_size
        self.native = native  # (B, C, h, w), (B, h, w, C) or (B, P + h*w, C): what net.forward_head reads

    @cached_property
    def _split(self) -> tuple[Tensor, Tensor | None]:
        return split_native(self.net, self.native, self.image_size)

    @property
    def map(self) -> Tensor:  # (B, C, h, w) the last feature map (after the backbone's final norm)
        return self._split[0]

    @property
    def prefix(self) -> Tensor | None:  # (B, P, C) class / distillation / register tokens (NLC), else None
        return self._split[1]


def _name(net: nn.Module) -> str:
    return getattr(net, "default_cfg", {}).get("architecture", type(net).__name__)


def layout(net: nn.Module) -> str:
    """NCHW, NHWC or NLC: the layout of `net.forward_features`' output."""
    fmt = getattr(net, "output_fmt", NCHW)
    if getattr(fmt, "value", fmt) == NHWC:
        return NHWC
    if hasattr(net, "num_prefix_tokens") and hasattr(net, "patch_embed"):
        return NLC
    return NCHW


def prefix_names(net: nn.Module) -> list[str]:
    """Names of the prefix tokens of an NLC backbone, in order: 'class', 'distillation', 'register1', ..."""
    if layout(net) != NLC:
        return []
    names = ["class"] if getattr(net, "cls_token", None) is not None else []
    if getattr(net, "dist_token", None) is not None:
        names.append("distillation")
    registers = getattr(net, "num_reg_tokens", 0) or 0
    names += [f"register{i + 1}" for i in range(registers)]
    return names if len(names) == net.num_prefix_tokens else [f"prefix{i}" for i in range(net.num_prefix_tokens)]


def grid_size(net: nn.Module, tokens: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of the patch grid of an NLC backbone holding `tokens` patch tokens."""
    embed = getattr(net, "patch_embed", None)
    if image_size is not None and hasattr(embed, "dynamic_feat_size"):
        h, w = embed.dynamic_feat_size(tuple(image_size))
        if h * w == tokens:
            return h, w
    grid = getattr(embed, "grid_size", None)
    if grid is not None and grid[0] * grid[1] == tokens:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UserError(f"backbone '{_name(net)}' returns {tokens} patch tokens, which fgvc cannot arrange "
                        "into a grid; use a ViT/DeiT/EVA/Swin or a CNN backbone.")
    return side, side


def to_map(net: nn.Module, native: Tensor, image_size: tuple[int, int] | None = None) -> SpatialFeatures:
    """forward_features' output -> SpatialFeatures (a reshape: no copy of the NCHW layout, no new
    computation). `image_size` (H, W) of the input fixes the patch grid of token backbones."""
    return SpatialFeatures(net, native, image_size)


def split_native(net: nn.Module, native: Tensor, image_size: tuple[int, int] | None) -> tuple[Tensor, Tensor | None]:
    """forward_features' output -> ((B, C, h, w) map, (B, P, C) prefix tokens or None)."""
    kind = layout(net)
    if kind == NCHW and native.ndim == 4:
        return native, None  # (B, C, h, w): the map fgvc always read
    if kind == NHWC and native.ndim == 4:
        return native.permute(0, 3, 1, 2), None  # (B, h, w, C) -> (B, C, h, w)
    if kind == NLC and native.ndim == 3:
        p = net.num_prefix_tokens
        b, n, c = native.shape
        h, w = grid_size(net, n - p, image_size)
        patches = native[:, p:].transpose(1, 2).reshape(b, c, h, w)  # (B, N - P, C) -> (B, C, h, w)
        return patches, native[:, :p] if p else None
    shape = ", ".join(["B", *map(str, native.shape[1:])])
    raise UserError(f"backbone '{_name(net)}' gives features of shape ({shape}), not a spatial map fgvc "
                    "can read; use a CNN (resnet, convnext, efficientnet, regnet) or a ViT/DeiT/EVA/Swin backbone.")


def spatial_features(net: nn.Module, x: Tensor) -> SpatialFeatures:
    """(B, 3, H, W) -> SpatialFeatures of the backbone's last layer: one `forward_features` call."""
    return to_map(net, net.forward_features(x), tuple(x.shape[-2:]))


def features_only_map(net: nn.Module, x: Tensor) -> Tensor:
    """The deepest level of a timm `features_only=True` network as (B, C, h, w): timm gives Swin's
    levels as NHWC (its `output_fmt`), every other family's as NCHW."""
    level = net(x)[-1]
    fmt = getattr(net, "output_fmt", NCHW)
    return level.permute(0, 3, 1, 2) if getattr(fmt, "value", fmt) == NHWC else level


def intermediate_maps(net: nn.Module, x: Tensor, indices: Sequence[int]) -> tuple[SpatialFeatures, list[Tensor]]:
    """The last features and the (B, C, h, w) maps of the blocks/stages `indices` (timm's
    feature_info indexing) in one pass: timm's `forward_intermediates(..., output_fmt="NCHW")`."""
    if not hasattr(net, "forward_intermediates"):
        raise UserError(f"backbone '{_name(net)}' has no timm forward_intermediates, so its intermediate maps "
                        "cannot be read; use a timm CNN, ViT or Swin backbone.")
    native, maps = net.forward_intermediates(x, indices=list(indices), output_fmt=NCHW)
    return to_map(net, native, tuple(x.shape[-2:])), list(maps)


def pooled_width(net: nn.Module) -> int:
    """Width of `net.forward_head(..., pre_logits=True)`: the map's channels, or the hidden width of a
    head with a layer after the pool (MobileNetV3's conv_head, an MLP head)."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


def reduction(net: nn.Module) -> int:
    """Input pixels per cell of the last map (a ViT's patch size, a CNN's total stride)."""
    return int(net.feature_info[-1]["reduction"])


def output_module(net: nn.Module, x: Tensor) -> nn.Module:
    """The outermost module whose output is `forward_features`' output itself (for forward hooks,
    e.g. Grad-CAM's target layer), found with one probe forward of `x` (one image suffices)."""
    found: list[tuple[str, Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: found.append((name, out)))
               for name, m in net.named_modules() if name]
    try:
        with torch.no_grad():
            native = net.forward_features(x)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, out in found if out is native]
    if not names:
        raise UserError(f"no module of backbone '{_name(net)}' outputs its final features, so hooks cannot read them; "
                        "use cam instead of gradcam.")
    return net.get_submodule(min(names, key=lambda n: n.count(".")))


# ---------------------------------------------------------------------------------------------
# The head relation and class activation maps


@dataclass
class LinearHead:
    """logits = weight . norm(pool(features)) + bias: how a backbone's pooled features become logits."""

    weight: Tensor  # (K, C)
    bias: Tensor | None  # (K,)
    pool: str  # AVG: mean over the map's positions | TOKEN: the class (and distillation) token
    norm: nn.Module | None = None  # a LayerNorm on the pooled vector (normalising the channels), or None


def _pool_type(net: nn.Module) -> str:
    for owner in (net, getattr(net, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if pool is not None and hasattr(pool, "pool_type"):
            return pool.pool_type
    return AVG


def _norm_or_none(module: nn.Module | None) -> nn.Module | None:
    return None if module is None or isinstance(module, nn.Identity) else module


def head_relation(net: nn.Module, classifier: nn.Linear | None = None) -> LinearHead:
    """The linear relation from the backbone's last map to the logits of `classifier` (a linear layer
    reading `net.forward_head(..., pre_logits=True)`), or of the backbone's own classifier."""
    name = _name(net)
    kind = layout(net)
    pool = _pool_type(net)
    distilled = getattr(net, "head_dist", None) is not None
    no_linear = (f"backbone '{name}' has no linear classifier on pooled features (pool '{pool}'), so it has no "
                 "class activation map; use gradcam.")
    if kind == NLC:
        if distilled or pool == TOKEN:
            mode = TOKEN
        elif pool in AVG_POOLS and not getattr(net, "pool_include_prefix", False):
            mode = AVG
        else:
            raise UserError(no_linear)
        norm = _norm_or_none(getattr(net, "fc_norm", None))
    else:
        if pool not in AVG_POOLS:
            raise UserError(no_linear)
        mode, norm = AVG, None
        head = getattr(net, "head", None)
        if head is not None and hasattr(head, "norm") and hasattr(head, "pre_logits"):  # timm's NormMlpClassifierHead
            if not isinstance(head.pre_logits, nn.Identity):
                raise UserError(f"backbone '{name}' has a hidden layer between its pool and classifier, so it has no "
                                "class activation map; use gradcam.")
            norm = _norm_or_none(head.norm)
    if classifier is not None:
        fc = classifier
    elif distilled and mode == TOKEN:  # DeiT: logits = (head(class) + head_dist(distillation)) / 2
        w = (net.head.weight + net.head_dist.weight) / 2
        b = None if net.head.bias is None else (net.head.bias + net.head_dist.bias) / 2
        return LinearHead(w, b, TOKEN, norm)
    else:
        fc = net.get_classifier()
    if not isinstance(fc, nn.Linear) or fc.in_features != net.num_features:
        raise UserError(no_linear)
    return LinearHead(fc.weight, fc.bias, mode, norm)


def class_activation_map(feats: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """CAM (Zhou et al. 2016): a linear classifier on pooled features applied at every position,
    M_k(x, y) = sum_c w_kc f_c(x, y) + b_k: (B, C, h, w) -> (B, K, h, w)."""
    maps = torch.einsum("bchw,kc->bkhw", feats, weight)  # (B, K, h, w)
    return maps if bias is None else maps + bias[None, :, None, None]


def pooled_norm(feats: Tensor, norm: nn.Module) -> Tensor:
    """(B, C, h, w) -> (B, C, h, w): every position normalised like the pooled vector mean_p f(p) is
    by `norm` (a LayerNorm over channels): (f(p) - mu) / sqrt(var + eps) * gamma + beta with the
    pooled vector's mu and var, so the mean over positions is exactly norm(mean_p f(p))."""
    pooled = feats.mean((2, 3))  # (B, C)
    mu = pooled.mean(1)[:, None, None, None]  # (B, 1, 1, 1)
    var = pooled.var(1, unbiased=False)[:, None, None, None]
    out = (feats - mu) / torch.sqrt(var + norm.eps)  # (B, C, h, w)
    if getattr(norm, "weight", None) is not None:
        out = out * norm.weight[None, :, None, None]
    if getattr(norm, "bias", None) is not None:
        out = out + norm.bias[None, :, None, None]
    return out


def class_activation_maps(feats: SpatialFeatures, head: LinearHead) -> Tensor:
    """(B, K, h, w): the head applied at every position of the map (see the module docstring)."""
    f = feats.map
    if head.norm is not None:
        if head.pool == AVG:
            f = pooled_norm(f, head.norm)
        else:  # a norm on the class token: the same norm on every patch token
            f = head.norm(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return class_activation_map(f, head.weight, head.bias)


def check_cam(cams: Tensor, logits: Tensor, head: LinearHead, net: nn.Module) -> None:
    """An average-pool CAM must average back to the logits it explains; a backbone whose head does
    something else after the pool (unknown to `head_relation`) stops here with one sentence."""
    if head.pool != AVG:
        return
    mean = cams.mean((2, 3)).float()
    scale = logits.float().abs().amax().clamp_min(1.0)
    if not torch.allclose(mean, logits.float(), rtol=0, atol=CAM_CHECK_TOLERANCE * float(scale)):
        raise UserError(f"the head of backbone '{_name(net)}' is not a linear classifier after its average pool, so "
                        "it has no class activation map; use gradcam.")



def gradient_module(net: nn.Module, x: Tensor) -> nn.Module:
    """The module whose output Grad-CAM reads (its output goes through `to_map`): `output_module`,
    except under a class-token head, where no gradient of the logits reaches a patch token at the
    output; there, the last block's input norm (`blocks[-1].norm1`, pytorch-grad-cam's choice for
    ViTs), whose output the last attention mixes into the class token."""
    if layout(net) == NLC and head_reads_token(net) and hasattr(getattr(net, "blocks", [None])[-1], "norm1"):
        return net.blocks[-1].norm1
    return output_module(net, x)


def head_reads_token(net: nn.Module) -> bool:
    """True when the logits read prefix tokens only (ViT's class token, DeiT's class and distillation)."""
    return layout(net) == NLC and (getattr(net, "head_dist", None) is not None or _pool_type(net) == TOKEN)
