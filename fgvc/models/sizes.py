"""The input side a timm backbone is built for, and the check that it can take it.

timm builds vision transformers for one input size and stops on another (the patch grid of the
position embeddings of ViT, DeiT and EVA; the windows and attention masks of Swin; the partitions of
MaxViT and CoAtNet). The field fine-tunes them larger than their 224-px weights: ViT-B/16 at 448 px
(TransFG, He et al. 2022; RAMS-Trans, Hu et al. 2021; IELT, Xu et al. 2023), Swin at 384 px (Liu et
al. 2021, sec. 4.1; FGVC-PIM, Chou et al. 2022). `build_args` gives `timm.create_model` the
arguments that build a backbone for a side:

- absolute position embeddings (ViT, DeiT, EVA, BEiT): `img_size`; when weights load, timm's
  checkpoint filter of the family resamples them (bicubic) to the new patch grid
  (`weights.fit_checkpoint` does the same for a local file);
- Swin v1 and v2: `img_size` and a window of side / 32 cells, so that the last stage is one window
  as in the Swin paper's 384-px fine-tuning (window 7 at 224 px, 12 at 384 px); the relative
  position tables are resized when weights load (v1), the continuous position bias is scaled by
  the pretrained window (v2, `pretrained_window_sizes`, Liu et al. 2022 sec. 3.3);
- other fixed-size families (MaxViT, CoAtNet, ...): `img_size`.

Backbones that take any size (CNNs) get no arguments. `check_side` builds the backbone for the side
on the meta device (no memory, no weights) and runs one forward of a meta image: a side it cannot
take is one sentence naming the recipe key and the nearest sides that work, before any work starts.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import timm
import torch

from fgvc.errors import UserError

SWIN_MODULES = ("timm.models.swin_transformer", "timm.models.swin_transformer_v2")
SWIN_STRIDE = 32  # 4-px patches merged three times: every stage's grid is whole at a multiple of 32
SUGGESTIONS = 2  # nearest working sides named in the refusal


def _pretrained_cfg(name: str) -> Any:
    return timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])


def _module(name: str) -> str:
    try:
        return timm.models.model_entrypoint(name.split(".")[0]).__module__
    except RuntimeError:  # not a timm model: create_backbone names it
        return ""


def fixed_size(name: str) -> bool:
    """Whether timm builds this backbone for one input size (`fixed_input_size`)."""
    cfg = _pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


def pretrained_side(name: str) -> int:
    """The input side the backbone's default configuration (and its weights) are made for."""
    return int(_pretrained_cfg(name).input_size[-1])


@lru_cache(maxsize=None)
def _default_windows(name: str) -> tuple[tuple[int, int], ...]:
    """(window, pretrained window) per Swin stage of the backbone as timm builds it by default."""
    with torch.device("meta"):
        net = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0)
    found = []
    for layer in net.layers:
        attn = layer.blocks[0].attn
        window = attn.window_size[0]
        found.append((window, (getattr(attn, "pretrained_window_size", None) or (0,))[0]))
    return tuple(found)


def build_args(name: str, side: int) -> dict[str, Any]:
    """`timm.create_model` arguments that build backbone `name` for `side` x `side` inputs; none for
    backbones that take any size, or at their own pretrained side."""
    if not side or not fixed_size(name) or side == pretrained_side(name):
        return {}
    args: dict[str, Any] = {"img_size": side}
    module = _module(name)
    if module in SWIN_MODULES and side % SWIN_STRIDE == 0:
        args["window_size"] = side // SWIN_STRIDE  # the last stage is one window (Swin paper, 384 px: 12)
        if module == SWIN_MODULES[1]:  # v2: log-spaced position bias scaled by the window it was trained with
            args["pretrained_window_sizes"] = tuple(p or w for w, p in _default_windows(name))
    return args


def _frozen(value: Any) -> Any:
    """A recipe value (lists, mappings) as something hashable, for the caches below."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(args: tuple) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args}


@lru_cache(maxsize=None)
def _refusal(name: str, side: int, args: tuple = ()) -> str:
    """Why backbone `name` built for `side` (with the timm arguments `args`, frozen) cannot take a
    `side` x `side` image ("" if it can)."""
    if _module(name) in SWIN_MODULES and side % SWIN_STRIDE:
        return f"Swin's 4-px patches, merged three times, need a multiple of {SWIN_STRIDE}"
    try:
        with torch.device("meta"):
            net = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0,
                                    **{**build_args(name, side), **_thawed(args)})
            patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
            if patch is not None and side % patch[0] and not net.patch_embed.dynamic_img_pad:
                return f"its {patch[0]}-px patches do not tile it"
            net.forward_features(torch.zeros(1, 3, side, side))
    except TypeError as err:
        if "img_size" in str(err):
            return f"timm builds it for {pretrained_side(name)} px only"
        return str(err).splitlines()[0]
    except (AssertionError, RuntimeError, ValueError) as err:
        return (str(err).splitlines() or [type(err).__name__])[0]
    return ""


def _working_sides(name: str, side: int, args: tuple = ()) -> list[int]:
    """The sides nearest `side` (multiples of the backbone's deepest reduction) that it can take."""
    with torch.device("meta"):
        step = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0).feature_info[-1]["reduction"]
    candidates = sorted((step * k for k in range(max(1, side // step - 8), side // step + 9)), key=lambda s: abs(s - side))
    near: list[int] = []
    for candidate in candidates:
        if len(near) == SUGGESTIONS:
            break
        if candidate != side and not _refusal(name, candidate, args):
            near.append(candidate)
    return sorted(near)


def check_side(name: str, side: int, key: str, args: dict[str, Any] | None = None) -> None:
    """Raise one sentence when backbone `name` (with the timm arguments `args`, model.backbone_args)
    cannot be built for `side`-px inputs; `key` is the recipe key that sets the side. Backbones that
    take any size, and unknown names, pass."""
    if not fixed_size(name):
        return
    frozen = _frozen(dict(args or {}))
    why = _refusal(name, side, frozen)
    if not why:
        return
    near = _working_sides(name, side, frozen)
    fix = f"use e.g. {' or '.join(map(str, near))}" if near else f"use {pretrained_side(name)}"
    raise UserError(f"{key} is {side} px but backbone '{name}' cannot take it ({why}); {fix}.")
