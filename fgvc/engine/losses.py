"""Losses, all in one place: each criterion returns a dict of named terms whose "loss" entry is optimised.

Contract: `criterion(output, target) -> dict[str, Tensor]`; `target` is (B,) class indices, or
(B, K) soft targets when mixup/cutmix is on. The engine imports the models' output types; models
never import the engine.
"""

from __future__ import annotations

import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from fgvc.models.cfvit import CfvitOutput, CfvitSchedule
from fgvc.models.dcn import DcnOutput, DcnSchedule
from fgvc.models.outputs import final_logits
from fgvc.models.zoom import APN, CLS, PRETRAIN, ROLLOUT, ZoomOutput, ZoomSchedule

APN_INIT_WEIGHT = 1.0  # weight of the APN's regression toward the initial box; only the APNs feel it


def classification_loss(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy with hard (B,) or soft (B, K) targets (soft targets carry their own smoothing)."""
    if target.ndim == 2:
        return (-target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class ClassificationLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, output, target: Tensor) -> dict[str, Tensor]:
        ce = classification_loss(final_logits(output), target, self.label_smoothing)
        return {"loss": ce, "ce": ce}


# --- RA-CNN (Fu et al. 2017; fgvc/models/zoom.py) ----------------------------------------------


def true_class_probability(logits: Tensor, target: Tensor) -> Tensor:
    """p_t: (B,) softmax probability of the true class (for soft (B, K) targets, its expectation)."""
    probs = logits.softmax(-1)
    if target.ndim == 2:
        return (probs * target).sum(-1)
    return probs.gather(1, target[:, None]).squeeze(1)


def ranking_loss(p_coarse: Tensor, p_fine: Tensor, margin: float) -> Tensor:
    """Pairwise ranking loss (paper eq. 9): max(0, p_t^(s) - p_t^(s+1) + margin), batch mean."""
    return (p_coarse - p_fine + margin).clamp(min=0).mean()


class ZoomLoss(nn.Module):
    """Cross-entropy at every scale and on the fusion, the ranking loss between neighbouring scales,
    and the APNs' regression toward the initial boxes, combined by the phase the output was computed
    in (`ZoomOutput.phase`, chosen by the training loop's `ZoomSchedule`):

        PRETRAIN: sum_s ce_s + ce_fused + APN_INIT_WEIGHT * apn_init
        CLS:      sum_s ce_s + ce_fused
        APN:      rank_weight * rank
        JOINT:    sum_s ce_s + ce_fused + rank_weight * rank      (evaluation / no schedule)

    Every term is returned by name (detached) so all of them are logged in every phase."""

    def __init__(self, rank_margin: float = 0.05, rank_weight: float = 1.0, label_smoothing: float = 0.0,
                 rank_margins: tuple[float, ...] = ()) -> None:
        """`rank_margins`: the margin of each pair of neighbouring scales (s, s + 1); empty: `rank_margin`
        for every pair."""
        super().__init__()
        self.rank_margin, self.rank_weight, self.label_smoothing = rank_margin, rank_weight, label_smoothing
        self.rank_margins = tuple(rank_margins)

    def margin(self, pair: int) -> float:
        return self.rank_margins[pair] if self.rank_margins else self.rank_margin

    def forward(self, output: ZoomOutput, target: Tensor) -> dict[str, Tensor]:
        ces = [classification_loss(y, target, self.label_smoothing) for y in output.scale_logits]
        ce_fused = classification_loss(output.logits, target, self.label_smoothing)
        p_t = [true_class_probability(y, target) for y in output.scale_logits]
        rank = sum(ranking_loss(p_t[s], p_t[s + 1], self.margin(s)) for s in range(len(p_t) - 1))
        apn_init = sum(((p - i) ** 2).sum(1).mean() for p, i in zip(output.proposals, output.init_boxes))
        ce = sum(ces)
        if output.phase == PRETRAIN:
            loss = ce + ce_fused + APN_INIT_WEIGHT * apn_init
        elif output.phase == CLS:
            loss = ce + ce_fused
        elif output.phase == APN:
            loss = self.rank_weight * rank
        else:
            loss = ce + ce_fused + self.rank_weight * rank
        terms = {f"ce_scale{s}": v for s, v in enumerate(ces)}
        terms.update(ce_fused=ce_fused, rank=rank, apn_init=apn_init)
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


# --- DCN (Almahairi et al. 2016; fgvc/models/dcn.py) -------------------------------------------


class DcnLoss(nn.Module):
    """Per-branch losses: CE on the decision (mixed or fused) + hint_weight * the paper's hint loss
    (MSE between the coarse features and the stop-gradient fine features at the refined positions)
    + coarse_weight * CE on the coarse prediction (it trains the confidence that gates the early exit)
    + fine_weight * CE on the patch branch alone (the fine network learns patch features that decide
    by themselves, as GFNet's and MMAL-Net's local branches do)."""

    def __init__(self, hint_weight: float = 1.0, coarse_weight: float = 0.5, label_smoothing: float = 0.0,
                 fine_weight: float = 0.0) -> None:
        super().__init__()
        self.hint_weight = hint_weight
        self.coarse_weight = coarse_weight
        self.fine_weight = fine_weight
        self.label_smoothing = label_smoothing

    def forward(self, output: DcnOutput, target: Tensor) -> dict[str, Tensor]:
        ce = classification_loss(output.logits, target, self.label_smoothing)
        zero = ce.new_zeros(())
        hint = zero
        if output.coarse_selected is not None and output.coarse_selected.numel():
            hint = F.mse_loss(output.coarse_selected, output.fine_selected.detach())
        coarse_ce = zero
        if output.coarse_logits is not None:
            coarse_ce = classification_loss(output.coarse_logits, target, self.label_smoothing)
        fine_ce = zero
        if output.fine_logits is not None:
            fine_ce = classification_loss(output.fine_logits, target, self.label_smoothing)
        loss = ce + self.hint_weight * hint + self.coarse_weight * coarse_ce + self.fine_weight * fine_ce
        return {"loss": loss, "ce": ce, "hint": hint, "coarse_ce": coarse_ce, "fine_ce": fine_ce}


# --- CF-ViT (Chen et al. 2023; fgvc/models/cfvit.py) ----------------------------------------------


def distillation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(sg(teacher)) || softmax(student)), batch mean: the coarse pass learns the fine
    pass's prediction, which it does not train (the authors' `KLDivLoss(reduction='batchmean')`)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.softmax(teacher_logits.detach().float(), -1),
                    reduction="batchmean")


class CfvitLoss(nn.Module):
    """fine_weight * CE(y_fine) + coarse_weight * CE(y_coarse) + distill_weight * KL(sg(y_fine) || y_coarse).
    The authors' code: weights 1, 0, 1 (the coarse pass is supervised only through the fine one)."""

    def __init__(self, fine_weight: float = 1.0, coarse_weight: float = 0.0, distill_weight: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.fine_weight, self.coarse_weight, self.distill_weight = fine_weight, coarse_weight, distill_weight
        self.label_smoothing = label_smoothing

    def forward(self, output: CfvitOutput, target: Tensor) -> dict[str, Tensor]:
        fine_ce = classification_loss(output.fine_logits, target, self.label_smoothing)
        coarse_ce = classification_loss(output.coarse_logits, target, self.label_smoothing)
        distill = distillation(output.coarse_logits, output.fine_logits)
        loss = self.fine_weight * fine_ce + self.coarse_weight * coarse_ce + self.distill_weight * distill
        return {"loss": loss, "fine_ce": fine_ce.detach(), "coarse_ce": coarse_ce.detach(), "distill": distill.detach()}


# --- from the recipe ---------------------------------------------------------------------------


def build_criterion(cfg: DictConfig) -> nn.Module:
    """The loss of the recipe's model.arch, every weight from the recipe."""
    t = cfg.train
    smoothing = 0.0 if (t.mixup or t.cutmix) else t.label_smoothing
    if cfg.model.arch == "racnn":
        return ZoomLoss(rank_margin=t.zoom.rank_margin, rank_weight=t.zoom.rank_weight, label_smoothing=smoothing,
                        rank_margins=tuple(t.zoom.rank_margins))
    if cfg.model.arch == "cfvit":
        c = t.cfvit
        return CfvitLoss(fine_weight=c.fine_weight, coarse_weight=c.coarse_weight, distill_weight=c.distill_weight,
                         label_smoothing=smoothing)
    if cfg.model.arch == "dcn":
        return DcnLoss(hint_weight=t.dcn.hint_weight, coarse_weight=t.dcn.coarse_weight, label_smoothing=smoothing,
                       fine_weight=t.dcn.fine_weight)
    return ClassificationLoss(smoothing)


def build_schedule(cfg: DictConfig, updates_per_epoch: int) -> ZoomSchedule | DcnSchedule | CfvitSchedule | None:
    """RA-CNN's alternation of phases (paper sec. 3.4), the DCN's stages and k per update, or CF-ViT's
    two stages, counted in optimizer updates; None for the other archs. The training loop is its one
    owner: it asks `phase(update)` before each forward."""
    if cfg.model.arch == "cfvit":
        return CfvitSchedule(select_updates=round(cfg.train.cfvit.select_from * cfg.train.epochs) * updates_per_epoch)
    if cfg.model.arch == "dcn":
        d = cfg.train.dcn
        if cfg.model.dcn.whole_image:
            return None
        return DcnSchedule(top_k=cfg.model.dcn.top_k, k_min=d.k_min, k_max=d.k_max, random_share=d.random_share,
                           fine_updates=d.fine_epochs * updates_per_epoch,
                           select_updates=d.select_epochs * updates_per_epoch, seed=cfg.seed)
    if cfg.model.arch != "racnn":
        return None
    z = cfg.train.zoom
    if cfg.model.zoom.proposal == ROLLOUT:  # RAMS-Trans's box is not learned: classification updates only
        return ZoomSchedule(pretrain_updates=0, cls_steps=1, apn_steps=0)
    return ZoomSchedule(pretrain_updates=z.pretrain_epochs * updates_per_epoch, cls_steps=z.cls_steps,
                        apn_steps=z.apn_steps)
