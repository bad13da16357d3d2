"""The optimizer a recipe names, over parameter groups (no decay on biases and norms; new layers faster)."""

from __future__ import annotations

import difflib

import timm.optim
import timm.scheduler
import torch
from omegaconf import DictConfig

from fgvc.errors import UserError


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
    """timm's optimizer named by train.optimizer over `param_groups`; an unknown name or a value the
    optimizer refuses is one sentence."""
    try:
        return timm.optim.create_optimizer_v2(param_groups(model, t.lr, t.weight_decay, t.new_lr_mult),
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
