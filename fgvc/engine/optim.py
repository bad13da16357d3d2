"""The optimizer a recipe names, over parameter groups (no decay on biases and norms; new layers faster)."""

from __future__ import annotations

import timm.optim
import torch
from omegaconf import DictConfig


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, new_lr_mult: float) -> list[dict]:
    """No decay on biases and norms; parameters that are not pretrained get lr * new_lr_mult."""
    pretrained = getattr(model, "pretrained_names", set())
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = bool(pretrained) and name not in pretrained
        no_decay = p.ndim <= 1
        g = groups.setdefault((new, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr": lr * (new_lr_mult if new else 1.0)})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    """timm's optimizer named by train.optimizer over `param_groups`."""
    return timm.optim.create_optimizer_v2(param_groups(model, t.lr, t.weight_decay, t.new_lr_mult), opt=t.optimizer,
                                          lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum)
