"""Dynamic Capacity Networks (Almahairi et al., ICML 2016) with timm backbones.

A cheap coarse network f_c reads the whole image at low resolution; the paper's saliency, the norm
over channels of d H(softmax(g(f_c(x)))) / d f_c(x) (H the entropy of the coarse prediction), picks
the k positions whose features matter most; a costly fine network f_f reads only the full-resolution
patches under those positions, and its features replace the coarse ones there:

    mixed = f_c(x) with f_c(x)[i] := proj(f_f(patch_i)) for the k most salient positions i
    logits = g(mixed),  coarse_logits = g(f_c(x))          (g: the shared top layers + classifier)

Training adds the paper's hint loss ||f_c(x)[i] - sg(proj(f_f(patch_i)))||^2 at the chosen positions
(sg: stop-gradient), and optionally a cross-entropy on the coarse prediction so that its confidence can
gate an early exit: images whose coarse prediction is confident enough stop there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.engine.losses import classification_loss
from fgvc.errors import UserError
from fgvc.models.classifier import create_backbone

SHARE_ROUNDING = 1e-9  # so that a share such as 0.29 of 100 images counts 29, not 28.999...
NEVER_EXIT = 2.0  # a confidence threshold above 1: no image stops at the coarse prediction
ALWAYS_EXIT = -1.0  # a confidence threshold below 0: every image stops at the coarse prediction


def escalate(coarse_logits: Tensor, threshold: float) -> Tensor:
    """(B,) bool: images whose coarse prediction is not confident enough to stop there.
    A threshold above 1 escalates every image, one below 0 none."""
    return coarse_logits.softmax(-1).amax(-1) < threshold


def choose_threshold(val_coarse_logits: Tensor, max_share: float) -> float:
    """The confidence threshold that escalates at most `max_share` of the images whose cached
    coarse logits are given (the VALIDATION split; never choose on test)."""
    confidence = val_coarse_logits.float().softmax(-1).amax(-1).sort().values  # (N,) ascending
    n = confidence.numel()
    m = math.floor(max(0.0, min(1.0, max_share)) * n + SHARE_ROUNDING)  # escalate the m least confident
    if m >= n:
        return NEVER_EXIT
    if m == 0:
        return ALWAYS_EXIT
    return float(confidence[m])  # escalates exactly those with confidence < confidence[m]


def threshold_for_cost(val_coarse_logits: Tensor, target_flops: float, coarse_flops: float,
                       dcn_flops: float) -> float:
    """The threshold whose expected cost, coarse + share escalated * (dcn - coarse) FLOPs per
    image, stays within `target_flops` on the validation split's cached coarse logits."""
    share = (target_flops - coarse_flops) / max(dcn_flops - coarse_flops, 1e-12)
    return choose_threshold(val_coarse_logits, share)


class TopLayers(nn.Module):
    """g: the layers shared by the coarse and the mixed representation, then the classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        # no normalisation layer with running statistics: saliency runs g a second time
        self.conv = nn.Conv2d(channels, channels, 1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, feats: Tensor) -> Tensor:  # (B, C, h, w) -> (B, K)
        # functional calls, no submodule __call__: saliency runs this under autograd.grad, where the
        # module hooks of tools such as torch's FlopCounterMode must not fire
        hidden = F.relu(F.conv2d(feats, self.conv.weight, self.conv.bias))  # (B, C, h, w)
        return F.linear(hidden.mean((2, 3)), self.classifier.weight, self.classifier.bias)  # (B, K)


def entropy_saliency(head: TopLayers, coarse_feats: Tensor) -> Tensor:
    """The paper's saliency (Almahairi et al. 2016, sec. 3.2): || d H(softmax(g(f_c))) / d f_c ||_2
    over channels, (B, C, h, w) -> (B, h, w). Computed on a detached copy with `torch.autograd.grad`,
    so it leaves no gradient on any parameter and works when the caller is under `torch.no_grad`."""
    with torch.enable_grad():
        feats = coarse_feats.detach().requires_grad_(True)  # (B, C, h, w)
        log_p = head.forward(feats).float().log_softmax(-1)  # (B, K); no module hooks (see TopLayers)
        entropy = -(log_p.exp() * log_p).sum()  # summed over images: each image's grad is its own
        (grad,) = torch.autograd.grad(entropy, feats)
    return grad.norm(dim=1)  # (B, h, w)


@dataclass
class DcnOutput:
    logits: Tensor  # (B, K) prediction from the mixed representation (the coarse one when k = 0)
    coarse_logits: Tensor | None = None  # (B, K) from the coarse features only; None in whole-image mode
    saliency: Tensor | None = None  # (B, h, w) on the coarse grid; None when k = 0 or whole image
    positions: Tensor | None = None  # (B, k) long: flat coarse-grid indices (row * w + col) refined
    boxes: Tensor | None = None  # (B, k, 4) float: x1, y1, x2, y2 of each fine patch in input pixels
    coarse_selected: Tensor | None = None  # (B, k, C) coarse features at the refined positions (hint)
    fine_selected: Tensor | None = None  # (B, k, C) projected fine features there (hint target)

    def named_logits(self) -> dict[str, Tensor]:
        return {} if self.coarse_logits is None else {"coarse": self.coarse_logits}


class _Features(nn.Module):
    """Uniform `forward(x) -> (B, C, h, w)` over a timm model's forward_features and a
    features_only model (which returns a list of the feature levels asked for)."""

    def __init__(self, net: nn.Module, features_only: bool) -> None:
        super().__init__()
        self.net = net
        self.features_only = features_only

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[-1] if self.features_only else self.net.forward_features(x)


def _feature_extractor(name: str, stages: int, pretrained: bool, weights: str = "") -> tuple[_Features, set[str], int]:
    """A timm network returning a (B, C, h, w) feature map: all of it (`stages` = 0) or its first
    `stages` feature levels (timm's feature_info; for ResNets level 1 is the stem)."""
    if stages:
        with torch.device("meta"):  # only to count the levels, no memory or weights
            levels = len(create_backbone(name, 0, False)[0].feature_info)
        if not 1 <= stages <= levels:
            raise UserError(f"model.dcn.coarse_stages is {stages} but '{name}' has {levels} feature levels; "
                            f"use 0 (all) or 1..{levels}.")
        net, names = create_backbone(name, 0, pretrained, weights, features_only=True, out_indices=(stages - 1,))
        return _Features(net, features_only=True), names, net.feature_info.channels()[-1]
    net, names = create_backbone(name, 0, pretrained, weights)
    return _Features(net, features_only=False), names, net.num_features


class DCN(nn.Module):
    """Dynamic Capacity Network: coarse network everywhere, fine network on the top-k salient patches.

    `forward(x, top_k=None)` refines the recipe's k positions (or `top_k`); k = 0 is the coarse path.
    With `whole_image=True` the module is the fair full-image counterpart: the fine network on the
    whole image, then the same projection, top layers and classifier shape.
    """

    def __init__(self, num_classes: int, image_size: int, coarse_backbone: str = "test_resnet",
                 coarse_stages: int = 0, coarse_image_size: int = 0, fine_backbone: str = "test_resnet",
                 patch_size: int = 32, top_k: int = 4, saliency: str = "entropy",
                 exit_threshold: float = NEVER_EXIT, whole_image: bool = False,
                 pretrained: bool = False, coarse_weights: str = "", fine_weights: str = "") -> None:
        super().__init__()
        if saliency == "gate":
            raise UserError("model.dcn.saliency='gate' needs an attention gate in the coarse network, which "
                            "dcn does not build; use model.dcn.saliency=entropy.")
        if saliency != "entropy":
            raise UserError(f"model.dcn.saliency is '{saliency}' but must be entropy or gate.")
        if top_k < 0 or patch_size < 1:
            raise UserError("model.dcn.top_k must be at least 0 and model.dcn.patch_size at least 1.")
        self.image_size = image_size
        self.coarse_image_size = coarse_image_size or image_size // 2
        self.patch_size = patch_size
        self.top_k = top_k
        self.exit_threshold = exit_threshold
        self.whole_image = whole_image
        self.pretrained_names: set[str] = set()

        fine, fine_names, fine_width = _feature_extractor(fine_backbone, 0, pretrained, fine_weights)
        self.fine = fine
        self.pretrained_names |= {f"fine.net.{n}" for n in fine_names}
        if whole_image:  # the coarse network's width only fixes the head shape: build it on meta
            with torch.device("meta"):
                _, _, width = _feature_extractor(coarse_backbone, coarse_stages, False)
            self.coarse = None
        else:
            coarse, coarse_names, width = _feature_extractor(coarse_backbone, coarse_stages, pretrained,
                                                            coarse_weights)
            self.coarse = coarse
            self.pretrained_names |= {f"coarse.net.{n}" for n in coarse_names}
        self.width = width
        # the paper's fine features replace coarse ones: a learned 1x1 projection when widths differ
        self.project = nn.Conv2d(fine_width, width, 1) if fine_width != width else nn.Identity()
        self.head = TopLayers(width, num_classes)

    # --- the three paths -------------------------------------------------------------------------

    def coarse_features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        if self.coarse is None:
            raise UserError("this dcn model was built with model.dcn.whole_image=true and has no coarse network.")
        if x.shape[-1] != self.coarse_image_size or x.shape[-2] != self.coarse_image_size:
            x = F.interpolate(x, size=(self.coarse_image_size, self.coarse_image_size), mode="bilinear",
                              align_corners=False, antialias=True)  # (B, 3, Hc, Wc)
        return self.coarse(x)

    def fine_vectors(self, patches: Tensor) -> Tensor:  # (N, 3, P, P) -> (N, C)
        """Projected fine features of each patch, pooled to one vector per patch."""
        feats = self.fine(patches).mean((2, 3), keepdim=True)  # (N, Cf, 1, 1)
        return self.project(feats).flatten(1)  # (N, C)

    def forward_whole_image(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, K)
        """The fine network on the whole image, then projection, top layers, classifier."""
        return self.head(self.project(self.fine(x)))

    def patch_boxes(self, positions: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """(B, k) flat coarse-grid indices -> (B, k, 4) x1, y1, x2, y2 patch boxes in input pixels:
        a patch_size square centred on the position's cell (it may reach past the border)."""
        (h, w), (height, width) = grid, size
        rows, cols = positions // w, positions % w  # (B, k)
        half = self.patch_size / 2
        y1 = torch.floor((rows + 0.5) * (height / h) - half + 0.5)  # round half up, the same everywhere
        x1 = torch.floor((cols + 0.5) * (width / w) - half + 0.5)
        return torch.stack([x1, y1, x1 + self.patch_size, y1 + self.patch_size], -1).float()  # (B, k, 4)

    def extract_patches(self, x: Tensor, boxes: Tensor) -> Tensor:
        """Full-resolution patches under `boxes` (B, k, 4), zero-padded past the border, gathered in
        one batched index (no loop over images or patches): (B, 3, H, W) -> (B * k, 3, P, P)."""
        b, k = boxes.shape[:2]
        p = self.patch_size
        pad = p // 2 + 1  # a patch centred anywhere in the image fits in the padded image
        padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2pad, W+2pad, 3)
        offsets = torch.arange(p, device=x.device)
        ys = boxes[..., 1].long()[..., None] + pad + offsets  # (B, k, P)
        xs = boxes[..., 0].long()[..., None] + pad + offsets  # (B, k, P)
        image = torch.arange(b, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
        patches = padded[image, ys[..., :, None], xs[..., None, :]]  # (B, k, P, P, 3)
        return patches.permute(0, 1, 4, 2, 3).reshape(b * k, x.shape[1], p, p)  # (B*k, 3, P, P)

    def refine(self, x: Tensor, coarse_feats: Tensor, coarse_logits: Tensor, k: int) -> DcnOutput:
        """The DCN path given the coarse features: saliency, top-k, fine patches, mix, top layers."""
        b, c, h, w = coarse_feats.shape
        k = min(k, h * w)
        saliency = entropy_saliency(self.head, coarse_feats)  # (B, h, w)
        positions = saliency.flatten(1).topk(k, dim=1).indices  # (B, k)
        boxes = self.patch_boxes(positions, (h, w), (x.shape[-2], x.shape[-1]))  # (B, k, 4)
        fine = self.fine_vectors(self.extract_patches(x, boxes)).view(b, k, c)  # (B, k, C)
        flat = coarse_feats.flatten(2)  # (B, C, h*w)
        index = positions[:, None, :].expand(b, c, k)  # (B, C, k)
        mixed = flat.scatter(2, index, fine.transpose(1, 2).to(flat.dtype)).view(b, c, h, w)  # (B, C, h, w)
        coarse_selected = flat.gather(2, index).transpose(1, 2)  # (B, k, C)
        return DcnOutput(logits=self.head(mixed), coarse_logits=coarse_logits, saliency=saliency,
                         positions=positions, boxes=boxes, coarse_selected=coarse_selected,
                         fine_selected=fine)

    def forward(self, x: Tensor, top_k: int | None = None) -> DcnOutput:  # (B, 3, H, W)
        if self.whole_image:
            return DcnOutput(logits=self.forward_whole_image(x))
        k = self.top_k if top_k is None else top_k
        coarse_feats = self.coarse_features(x)  # (B, C, h, w)
        coarse_logits = self.head(coarse_feats)  # (B, K)
        if k == 0:
            return DcnOutput(logits=coarse_logits, coarse_logits=coarse_logits)
        out = self.refine(x, coarse_feats, coarse_logits, k)
        if not self.training and self.exit_threshold <= 1:  # early exit without a host sync
            keep_fine = escalate(coarse_logits, self.exit_threshold)[:, None]  # (B, 1)
            out.logits = torch.where(keep_fine, out.logits, coarse_logits)
        return out

    @torch.no_grad()
    def early_exit(self, x: Tensor, threshold: float, top_k: int | None = None) -> tuple[Tensor, Tensor]:
        """Inference that saves the fine work: only escalated images go on to the fine network.
        Returns (B, K) logits and the (B,) bool escalation mask. The batch shrinks to the escalated
        images, which needs their count on the host: this is the method to time, not `forward`."""
        k = self.top_k if top_k is None else top_k
        coarse_feats = self.coarse_features(x)  # (B, C, h, w)
        coarse_logits = self.head(coarse_feats)  # (B, K)
        escalated = escalate(coarse_logits, threshold)  # (B,)
        chosen = escalated.nonzero().squeeze(1)  # (E,)
        if chosen.numel() == 0 or k == 0:
            return coarse_logits, escalated
        fine = self.refine(x[chosen], coarse_feats[chosen], coarse_logits[chosen], k).logits  # (E, K)
        return coarse_logits.index_copy(0, chosen, fine), escalated


class DcnLoss(nn.Module):
    """CE on the mixed prediction + hint_weight * the paper's hint loss (MSE between the coarse
    features and the stop-gradient fine features at the refined positions) + coarse_weight * CE on
    the coarse prediction (it trains the confidence that gates the early exit)."""

    def __init__(self, hint_weight: float = 1.0, coarse_weight: float = 0.5, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.hint_weight = hint_weight
        self.coarse_weight = coarse_weight
        self.label_smoothing = label_smoothing

    def forward(self, output: DcnOutput, target: Tensor, update: int = 0, epoch: int = 0) -> dict[str, Tensor]:
        ce = classification_loss(output.logits, target, self.label_smoothing)
        zero = ce.new_zeros(())
        hint = zero
        if output.coarse_selected is not None and output.coarse_selected.numel():
            hint = F.mse_loss(output.coarse_selected, output.fine_selected.detach())
        coarse_ce = zero
        if output.coarse_logits is not None:
            coarse_ce = classification_loss(output.coarse_logits, target, self.label_smoothing)
        loss = ce + self.hint_weight * hint + self.coarse_weight * coarse_ce
        return {"loss": loss, "ce": ce, "hint": hint, "coarse_ce": coarse_ce}
