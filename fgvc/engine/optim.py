"""The optimizer a recipe names, over parameter groups (no decay on biases and norms; new layers
faster; optionally layer-wise learning-rate decay through the backbone)."""

from __future__ import annotations

import difflib

import timm.optim
import timm.scheduler
import torch
from omegaconf import DictConfig
from timm.models import group_parameters

from fgvc.errors import UserError



def layer_lr_scales(model: torch.nn.Module, layer_decay: float) -> dict[str, float]:
    """Layer-wise lr decay (Clark et al. 2020; BEiT, Bao et al. 2022): a parameter in layer i of a
    timm backbone with L layers gets lr * layer_decay ** (L - 1 - i), the layers being timm's own
    fine-grained `group_matcher` groups (ViT: embeddings, each block, the head; Swin, ConvNeXt:
    stem, each block, the head). Parameters outside timm backbones (attention blocks, fgvc heads)
    keep the full lr. Returns name -> scale for the backbones' parameters."""
    scales: dict[str, float] = {}
    outer: list[str] = []  # prefixes of the backbones found (a backbone's own sub-networks are its layers)
    for prefix, net in model.named_modules():
        if not hasattr(net, "group_matcher") or any(o == "" or prefix.startswith(o + ".") for o in outer):
            continue
        outer.append(prefix)
        layer_of = group_parameters(net, net.group_matcher(coarse=False), reverse=True)  # name -> layer id
        top = max(layer_of.values())
        for name, layer in layer_of.items():
            scales[f"{prefix}.{name}" if prefix else name] = layer_decay ** (top - layer)
    if not scales:
        raise UserError(f"train.layer_decay needs a timm backbone with layer groups, and this "
                        f"{type(model).__name__} has none; set train.layer_decay=0.")
    return scales


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, new_lr_mult: float,
                 layer_decay: float = 0.0, new_block_lr_mult: float = 1.0,
                 prefix_mults: dict[str, float] | None = None) -> list[dict]:
    """No decay on biases and norms. When the model has pretrained parameters, the others get a
    multiplied lr: its classifiers (`head_names`; every new parameter of a model without them)
    lr * new_lr_mult, other new parameters (attention blocks, proposal networks) lr * new_block_lr_mult;
    with 0 < layer_decay < 1, backbone layers get `layer_lr_scales` on top, and a parameter whose name
    starts with a key of `prefix_mults` that key's multiplier on top (RA-CNN: each proposal network's)."""
    pretrained = getattr(model, "pretrained_names", set())
    heads = getattr(model, "head_names", None)
    scales = layer_lr_scales(model, layer_decay) if 0 < layer_decay < 1 else {}
    groups: dict[tuple[float, bool, float], dict] = {}  # (lr multiplier, no decay, layer scale) -> group
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = bool(pretrained) and name not in pretrained
        mult = (new_lr_mult if heads is None or name in heads else new_block_lr_mult) if new else 1.0
        no_decay = p.ndim <= 1
        scale = scales.get(name, 1.0)
        scale *= next((m for prefix, m in (prefix_mults or {}).items() if name.startswith(prefix)), 1.0)
        g = groups.setdefault((mult, no_decay, scale), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                        "lr": lr * mult * scale})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    """timm's optimizer named by train.optimizer over `param_groups`; an unknown name or a value the
    optimizer refuses is one sentence."""
    try:
        apns = {f"apns.{i}.": m for i, m in enumerate(t.zoom.apn_lr_mults)}  # RA-CNN's proposal networks
        return timm.optim.create_optimizer_v2(param_groups(model, t.lr, t.weight_decay, t.new_lr_mult, t.layer_decay,
                                                           t.new_block_lr_mult, apns),
                                              opt=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                                              momentum=t.momentum)
    except ValueError as err:  # an unknown name, or torch's own checks ("Invalid momentum value", ...)
        if "not found" in str(err):
            close = difflib.get_close_matches(t.optimizer.lower(), timm.optim.list_optimizers(), n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see timm.optim.list_optimizers()."
            raise UserError(f"train.optimizer '{t.optimizer}' is not an optimizer timm knows; {hint}") from None
        raise UserError(f"train.optimizer '{t.optimizer}' refuses the recipe's values ({err}); fix them.") from None


def build_lr_scheduler(optimizer: torch.optim.Optimizer, t: DictConfig, updates_per_epoch: int):
    """timm's scheduler named by train.scheduler (with warm-up), stepped per update by the loop."""
    try:
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=t.scheduler, num_epochs=t.epochs, warmup_epochs=t.warmup_epochs, min_lr=t.min_lr,
            step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as err:
        raise UserError(f"train.scheduler '{t.scheduler}' cannot be built ({err}); use e.g. cosine, step or "
                        "constant.") from None
    return scheduler
