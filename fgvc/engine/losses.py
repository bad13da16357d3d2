"""Losses: each criterion returns a dict of named terms whose "loss" entry is optimised.

Contract: `criterion(output, target, update=int, epoch=int) -> dict[str, Tensor]`; `target` is
(B,) class indices, or (B, K) soft targets when mixup/cutmix is on.
"""

from __future__ import annotations

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fgvc.models.outputs import final_logits


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy with hard (B,) or soft (B, K) targets (soft targets carry their own smoothing)."""
    if target.ndim == 2:
        return (-target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class ClassificationLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, output, target: Tensor, update: int = 0, epoch: int = 0) -> dict[str, Tensor]:
        ce = classification_loss(final_logits(output), target, self.label_smoothing)
        return {"loss": ce, "ce": ce}


def build_criterion(cfg: DictConfig, steps_per_epoch: int) -> nn.Module:
    """The loss of the recipe's model.arch, every weight from the recipe."""
    t = cfg.train
    smoothing = 0.0 if (t.mixup or t.cutmix) else t.label_smoothing
    if cfg.model.arch == "racnn":
        from fgvc.models.zoom import ZoomLoss

        z = t.zoom
        return ZoomLoss(rank_margin=z.rank_margin, rank_weight=z.rank_weight, label_smoothing=smoothing,
                        pretrain_updates=z.pretrain_epochs * steps_per_epoch,
                        cls_steps=z.cls_steps, apn_steps=z.apn_steps)
    if cfg.model.arch == "dcn":
        from fgvc.models.dcn import DcnLoss

        return DcnLoss(hint_weight=t.dcn.hint_weight, coarse_weight=t.dcn.coarse_weight,
                       label_smoothing=smoothing)
    return ClassificationLoss(smoothing)
