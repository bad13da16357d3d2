"""Dynamic Capacity Networks (Almahairi et al., ICML 2016) with timm backbones.

A cheap coarse network f_c reads the whole image at low resolution; a saliency map on its grid picks
the k positions that matter; a costly fine network f_f reads only the full-resolution patches under
those positions (one batched call). Two ways to decide from them (`top_layers`):

    mix   (the paper)  mixed = f_c(x) with f_c(x)[i] := proj(f_f(patch_i)) for the k chosen i
                       logits = g(mixed),  g = 1x1 conv, ReLU, global pool, classifier; the pool is
                       the paper's global MAX (`pool="max"`, a few refined cells can decide) or an average
    fuse               v_c = pool(relu(conv(f_c(x))))              the global coarse vector   (B, C)
                       u_i = relu(W_p proj(f_f(patch_i))),  a = softmax_i(w_a . u_i),  v_f = sum_i a_i u_i
                       logits = W [v_c; v_f]   (GFNet / CF-ViT / MMAL-Net style: the global vector is
                       fused with attention-pooled patch vectors instead of diluted by them)

In both, coarse_logits = g(f_c(x)) and fine_logits is the patch branch alone (g on the k fine vectors,
or W_f v_f), so each branch can have its own loss. Saliency (computed on DETACHED coarse features,
so the selector never trains the features it reads): the paper's || d H(softmax(g(f_c))) / d f_c ||
over channels (H the entropy), or the coarse network's class activation map of its predicted class
(`saliency="cam"`, no backward pass).

Training adds the paper's hint loss ||f_c(x)[i] - sg(proj(f_f(patch_i)))||^2 at the chosen positions
(sg: stop-gradient) and per-branch cross-entropies (`DcnLoss` in fgvc/engine/losses.py). The training
loop's `DcnSchedule` says, per update, how many positions to refine (k drawn at random, so that one
model serves every k), how many of them to draw at random instead of by saliency, and the stage:
FINE (every patch random, GFNet's first stage), SELECT (fine network frozen), JOINT. At inference,
images whose coarse prediction is confident enough stop early (threshold chosen on validation).

Why the defaults differ from the paper, with the runs that decided it: results/coarse_fine/design.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.classifier import create_backbone
from fgvc.models.features import class_activation_map

SHARE_ROUNDING = 1e-9  # so that a share such as 0.29 of 100 images counts 29, not 28.999...
NEVER_EXIT = 2.0  # a confidence threshold above 1: no image stops at the coarse prediction
ALWAYS_EXIT = -1.0  # a confidence threshold below 0: every image stops at the coarse prediction
FINE, SELECT, JOINT = "fine", "select", "joint"  # training stages (DcnStep.stage)
STEP_SEED_STRIDE = 1_000_003  # a prime: (seed, update) pairs map to distinct draws


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


def threshold_for_accuracy(val_coarse_logits: Tensor, val_refined_logits: Tensor, val_labels: Tensor,
                           max_drop: float) -> float:
    """The threshold that escalates the fewest VALIDATION images while the early-exit top-1 (coarse
    prediction for the confident, refined for the escalated) stays within `max_drop` points of the
    top-1 with every image refined. Escalating the m least confident, for every m at once:
    correct(m) = sum of refined-correct over the first m + sum of coarse-correct over the rest."""
    confidence = val_coarse_logits.float().softmax(-1).amax(-1)  # (N,)
    order = confidence.argsort()  # least confident first
    coarse_ok = (val_coarse_logits.argmax(-1) == val_labels)[order].float()  # (N,)
    refined_ok = (val_refined_logits.argmax(-1) == val_labels)[order].float()  # (N,)
    n = confidence.numel()
    zero = coarse_ok.new_zeros(1)
    # (N + 1,): top-1 in percent when the first m images are escalated, m = 0..N
    correct = torch.cat([zero, refined_ok.cumsum(0)]) + coarse_ok.sum() - torch.cat([zero, coarse_ok.cumsum(0)])
    top1 = 100 * correct / n
    target = 100 * refined_ok.mean() - max_drop
    m = int((top1 >= target - SHARE_ROUNDING).nonzero()[0])  # the fewest escalated (m = N always qualifies)
    return choose_threshold(val_coarse_logits, m / n)


class TopLayers(nn.Module):
    """g: the layers shared by the coarse and the mixed representation, then the classifier:
    [1x1 conv, ReLU,] global pool ("avg", or the paper's "max"), linear. Without `hidden` (the 1x1
    conv and ReLU) g is the plain classifier's head, pool and linear, which cannot die: with the
    fractal-pretrained networks of the synthetic benchmark, the ReLU units of the hidden layer went
    dead one by one while the loss was still at chance (a dead unit never returns), in every variant
    measured (models/dcn.py docstring), and the model collapsed to one class."""

    def __init__(self, channels: int, num_classes: int, pool: str = "avg", hidden: bool = True) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise UserError(f"model.dcn.pool is '{pool}'; use avg or max.")
        # no normalisation layer with running statistics: saliency runs g a second time
        self.conv = nn.Conv2d(channels, channels, 1) if hidden else None
        self.classifier = nn.Linear(channels, num_classes)
        self.pool = pool

    # functional calls, no submodule __call__: saliency runs these under autograd.grad, where the
    # module hooks of tools such as torch's FlopCounterMode must not fire
    def hidden(self, feats: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, h, w)
        if self.conv is None:
            return feats
        return F.relu(F.conv2d(feats, self.conv.weight, self.conv.bias))

    def vector(self, feats: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C): the pooled global vector
        hidden = self.hidden(feats)
        return hidden.amax((2, 3)) if self.pool == "max" else hidden.mean((2, 3))

    def forward(self, feats: Tensor) -> Tensor:  # (B, C, h, w) -> (B, K)
        return F.linear(self.vector(feats), self.classifier.weight, self.classifier.bias)


class PatchFusion(nn.Module):
    """`top_layers="fuse"`: attention-pool the refined patch vectors, u_i = relu(W_p x_i) (or
    u_i = x_i without `hidden`), a = softmax_i(w_a . u_i), v_f = sum_i a_i u_i, and classify
    [v_c; v_f] (v_c: the coarse global vector). Attention pooling is invariant to the order and,
    unlike a mean, to the number of patches, so one model serves every k."""

    def __init__(self, channels: int, num_classes: int, hidden: bool = True, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach  # the fused classifier learns on the branches' vectors; its loss trains neither network
        self.patch = nn.Linear(channels, channels) if hidden else None
        self.score = nn.Linear(channels, 1)
        self.fine_classifier = nn.Linear(channels, num_classes)
        self.fused_classifier = nn.Linear(2 * channels, num_classes)

    def forward(self, coarse_vector: Tensor, fine: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C) coarse vector, (B, k, C) patch vectors -> (fused logits, patch-branch logits), (B, K) each."""
        u = fine if self.patch is None else F.relu(self.patch(fine))  # (B, k, C)
        a = self.score(u).softmax(1)  # (B, k, 1)
        v_f = (a * u).sum(1)  # (B, C)
        both = torch.cat([coarse_vector, v_f], 1)  # (B, 2C)
        return self.fused_classifier(both.detach() if self.detach else both), self.fine_classifier(v_f)


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


def cam_saliency(head: TopLayers, coarse_feats: Tensor) -> Tensor:
    """The coarse network's class activation map of its own predicted class, (B, C, h, w) ->
    (B, h, w): no backward pass, and no gradient (the input is detached)."""
    with torch.no_grad():
        fc = head.classifier  # the one CAM definition; its bias shifts a class map, not its ranking
        maps = class_activation_map(head.hidden(coarse_feats.detach()), fc.weight, fc.bias)  # (B, K, h, w)
        predicted = head(coarse_feats.detach()).argmax(-1)  # (B,)
        return maps[torch.arange(len(predicted), device=maps.device), predicted]  # (B, h, w)


SALIENCY = {"entropy": entropy_saliency, "cam": cam_saliency}
# the paper's design (Almahairi et al. 2016, section 2): entropy-gradient saliency, the mixed grid
# through a 1x1 conv + ReLU, one loss on the mixed prediction
PAPER = dict(saliency="entropy", top_layers="mix", top_hidden=True, detach_fusion=False)


def choose_positions(saliency: Tensor, k: int, n_random: int = 0) -> Tensor:
    """(B, h, w) saliency -> (B, k) flat positions: the k - n_random most salient, then n_random
    drawn uniformly from the rest (training only: random patches teach the fine network patches in
    general and keep the selection from locking in early)."""
    order = saliency.flatten(1).argsort(dim=1, descending=True)  # (B, h*w)
    n_random = min(n_random, k)
    salient = order[:, :k - n_random]  # (B, k - r)
    if n_random == 0:
        return salient
    rest = order[:, k - n_random:]  # (B, h*w - k + r)
    pick = torch.rand(rest.shape, device=rest.device).argsort(dim=1)[:, :n_random]  # (B, r)
    return torch.cat([salient, rest.gather(1, pick)], 1)  # (B, k)


@dataclass(frozen=True)
class DcnStep:
    """What one training update does (asked of `DcnSchedule` by the training loop)."""

    stage: str  # FINE: every patch random | SELECT: fine network frozen | JOINT
    top_k: int  # positions refined
    n_random: int  # of which drawn at random instead of by saliency


@dataclass
class DcnSchedule:
    """Staged training with k drawn at random, counted in optimizer updates: FINE for the first
    `fine_updates` (the fine network learns on random patches, GFNet's first stage), SELECT for the
    next `select_updates` (fine network frozen: the coarse network and top layers learn on salient
    patches), then JOINT. k is drawn uniformly from k_min..k_max per update (k_max = 0: always
    `top_k`), and about `random_share` of the k patches are drawn at random outside FINE. The draw is
    a function of (seed, update), so every process and a resumed run make the same one."""

    top_k: int
    k_min: int = 1
    k_max: int = 0
    random_share: float = 0.0
    fine_updates: int = 0
    select_updates: int = 0
    seed: int = 0

    def phase(self, update: int) -> DcnStep:
        rng = random.Random(self.seed * STEP_SEED_STRIDE + update)
        k = rng.randint(self.k_min, self.k_max) if self.k_max else self.top_k
        if update < self.fine_updates:
            return DcnStep(FINE, k, k)
        n_random = math.floor(self.random_share * k + rng.random())  # stochastic rounding: mean share * k
        return DcnStep(SELECT if update < self.fine_updates + self.select_updates else JOINT, k, n_random)


@dataclass
class DcnOutput:
    logits: Tensor  # (B, K) prediction from the mixed representation (the coarse one when k = 0)
    coarse_logits: Tensor | None = None  # (B, K) from the coarse features only; None in whole-image mode
    fine_logits: Tensor | None = None  # (B, K) from the k refined patches alone; None when k = 0
    saliency: Tensor | None = None  # (B, h, w) on the coarse grid; None when k = 0 or whole image
    positions: Tensor | None = None  # (B, k) long: flat coarse-grid indices (row * w + col) refined
    boxes: Tensor | None = None  # (B, k, 4) float: x1, y1, x2, y2 of each fine patch in input pixels
    coarse_selected: Tensor | None = None  # (B, k, C) coarse features at the refined positions (hint)
    fine_selected: Tensor | None = None  # (B, k, C) projected fine features there (hint target)

    def named_logits(self) -> dict[str, Tensor]:
        named = {} if self.coarse_logits is None else {"coarse": self.coarse_logits}
        return named | ({} if self.fine_logits is None else {"fine": self.fine_logits})


class _Features(nn.Module):
    """Uniform `forward(x) -> (B, C, h, w)` over a whole timm model and a features_only model (the
    feature levels asked for), both read through the one owner of feature maps (fgvc/models/features.py)."""

    def __init__(self, net: nn.Module, features_only: bool) -> None:
        super().__init__()
        self.net = net
        self.features_only = features_only

    def forward(self, x: Tensor) -> Tensor:
        if self.features_only:
            return fmaps.features_only_map(self.net, x)
        return fmaps.spatial_features(self.net, x).map

    def vector(self, x: Tensor) -> Tensor:  # (N, 3, P, P) -> (N, C)
        """One vector per image: the mean of the map for CNNs (and features_only levels); for
        transformers the vector their own head reads, which their pretraining shaped (a ViT's or
        DeiT's class token, an EVA's normalised token mean, Swin's pooled map). A head with a hidden
        layer of its own (MambaOut's: 4x wider than the map) is part of the classifier, not a
        feature: those networks give the map's mean too."""
        if self.features_only:
            return fmaps.features_only_map(self.net, x).mean((2, 3))
        feats = fmaps.spatial_features(self.net, x)
        if fmaps.layout(self.net) == fmaps.NCHW or fmaps.pooled_width(self.net) != self.net.num_features:
            return feats.map.mean((2, 3))  # (N, C)
        return self.net.forward_head(feats.native, pre_logits=True)  # (N, C)


def _feature_extractor(name: str, stages: int, pretrained: bool, weights: str = "",
                       backbone_args: dict | None = None, image_size: int = 0) -> tuple[_Features, set[str], int]:
    """A timm network built for `image_size`-px inputs returning a (B, C, h, w) feature map: all of
    it (`stages` = 0) or its first `stages` feature levels (timm's feature_info; for ResNets level 1
    is the stem)."""
    if stages:
        with torch.device("meta"):  # only to count the levels, no memory or weights
            levels = len(create_backbone(name, 0, False, **(backbone_args or {}))[0].feature_info)
        if not 1 <= stages <= levels:
            raise UserError(f"model.dcn.coarse_stages is {stages} but '{name}' has {levels} feature levels; "
                            f"use 0 (all) or 1..{levels}.")
        net, names = create_backbone(name, 0, pretrained, weights, image_size, features_only=True,
                                     out_indices=(stages - 1,), **(backbone_args or {}))
        return _Features(net, features_only=True), names, net.feature_info.channels()[-1]
    net, names = create_backbone(name, 0, pretrained, weights, image_size, **(backbone_args or {}))
    return _Features(net, features_only=False), names, net.num_features


class DCN(nn.Module):
    """Dynamic Capacity Network: coarse network everywhere, fine network on the top-k salient patches.

    `forward(x, top_k=None, phase=None)` refines the recipe's k positions (or `top_k`; in training,
    the schedule's `DcnStep`); k = 0 is the coarse path. With `whole_image=True` the module is the
    fair full-image counterpart: the fine network on the whole image, then the same projection, top
    layers and classifier shape. Every design argument is named: their defaults are the recipe's
    (fgvc.config.DcnConfig, which fgvc/models/build.py passes on), and `PAPER` holds the paper's.
    """

    def __init__(self, num_classes: int, image_size: int, *, coarse_backbone: str, coarse_stages: int,
                 coarse_image_size: int, fine_backbone: str, patch_size: int, top_k: int, saliency: str,
                 exit_threshold: float, whole_image: bool, pretrained: bool, pool: str, top_layers: str,
                 coarse_weights: str, fine_weights: str, top_hidden: bool, detach_fusion: bool,
                 backbone_args: dict | None = None) -> None:
        super().__init__()
        if saliency not in SALIENCY:
            raise UserError(f"model.dcn.saliency is '{saliency}'; use one of {', '.join(SALIENCY)}.")
        if top_layers not in ("mix", "fuse"):
            raise UserError(f"model.dcn.top_layers is '{top_layers}'; use mix or fuse.")
        self.image_size = image_size
        self.coarse_image_size = coarse_image_size or image_size // 2
        self.patch_size = patch_size
        self.top_k = top_k
        self.exit_threshold = exit_threshold
        self.whole_image = whole_image
        self.saliency = saliency
        self.pretrained_names: set[str] = set()

        # the fine network reads patch_size patches (whole_image: the whole image)
        fine, fine_names, fine_width = _feature_extractor(fine_backbone, 0, pretrained, fine_weights, backbone_args,
                                                          image_size if whole_image else patch_size)
        self.fine = fine
        self.pretrained_names |= {f"fine.net.{n}" for n in fine_names}
        if whole_image:  # the coarse network's width only fixes the head shape: build it on meta
            with torch.device("meta"):
                _, _, width = _feature_extractor(coarse_backbone, coarse_stages, False, "", backbone_args,
                                                 self.coarse_image_size)
            self.coarse = None
        else:
            coarse, coarse_names, width = _feature_extractor(coarse_backbone, coarse_stages, pretrained,
                                                            coarse_weights, backbone_args, self.coarse_image_size)
            self.coarse = coarse
            self.pretrained_names |= {f"coarse.net.{n}" for n in coarse_names}
        self.width = width
        # the paper's fine features replace coarse ones: a learned 1x1 projection when widths differ
        self.project = nn.Conv2d(fine_width, width, 1) if fine_width != width else nn.Identity()
        self.head = TopLayers(width, num_classes, pool, top_hidden)
        fuse = top_layers == "fuse" and not whole_image
        self.fusion = PatchFusion(width, num_classes, top_hidden, detach_fusion) if fuse else None

    # --- the three paths -------------------------------------------------------------------------

    def coarse_input(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 3, Hc, Wc): the image the coarse network reads
        if x.shape[-1] != self.coarse_image_size or x.shape[-2] != self.coarse_image_size:
            x = F.interpolate(x, size=(self.coarse_image_size, self.coarse_image_size), mode="bilinear",
                              align_corners=False, antialias=True)  # (B, 3, Hc, Wc)
        return x

    def coarse_features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        if self.coarse is None:
            raise UserError("this dcn model was built with model.dcn.whole_image=true and has no coarse network.")
        return self.coarse(self.coarse_input(x))

    def fine_vectors(self, patches: Tensor) -> Tensor:  # (N, 3, P, P) -> (N, C)
        """Projected fine features of each patch, pooled to one vector per patch (`_Features.vector`)."""
        feats = self.fine.vector(patches)[:, :, None, None]  # (N, Cf, 1, 1)
        return self.project(feats).flatten(1)  # (N, C)

    def class_activation_maps(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, K, h, w)
        """CAM (Zhou et al. 2016) of the coarse path, g's hidden map under its classifier (g pools
        after its 1x1 conv); in whole-image mode, of the fine network's projected features. With
        `pool="avg"` its average over positions is the coarse logits; with "max" it is the classifier's
        score at each position, whose average is not."""
        feats = self.project(self.fine(x)) if self.coarse is None else self.coarse_features(x)  # (B, C, h, w)
        fc = self.head.classifier
        return class_activation_map(self.head.hidden(feats), fc.weight, fc.bias)

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

    def decide(self, coarse_feats: Tensor, fine: Tensor, positions: Tensor) -> tuple[Tensor, Tensor | None]:
        """The top layers: (B, C, h, w) coarse features, (B, k, C) fine vectors at the (B, k)
        positions -> (logits, patch-branch logits), (B, K) each (mix: the patch branch in training only)."""
        if self.fusion is not None:
            return self.fusion(self.head.vector(coarse_feats), fine.to(coarse_feats.dtype))
        b, c, h, w = coarse_feats.shape
        index = positions[:, None, :].expand(b, c, positions.shape[1])  # (B, C, k)
        mixed = coarse_feats.flatten(2).scatter(2, index, fine.transpose(1, 2).to(coarse_feats.dtype))  # (B, C, h*w)
        fine_only = fine.transpose(1, 2)[..., None].to(coarse_feats.dtype)  # (B, C, k, 1): g on the patches alone
        # the patch branch only trains (its loss); inference does not pay for it
        return self.head(mixed.view(b, c, h, w)), self.head(fine_only) if self.training else None

    def refine(self, x: Tensor, coarse_feats: Tensor, coarse_logits: Tensor, k: int, n_random: int = 0,
               freeze_fine: bool = False) -> DcnOutput:
        """The DCN path given the coarse features: saliency, top-k (n_random of them drawn at random),
        fine patches, top layers. `freeze_fine`: no gradient reaches the fine network (SELECT stage)."""
        b, c, h, w = coarse_feats.shape
        k = min(k, h * w)
        saliency = SALIENCY[self.saliency](self.head, coarse_feats)  # (B, h, w), detached
        positions = choose_positions(saliency, k, n_random)  # (B, k)
        boxes = self.patch_boxes(positions, (h, w), (x.shape[-2], x.shape[-1]))  # (B, k, 4)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_fine):
            fine = self.fine_vectors(self.extract_patches(x, boxes)).view(b, k, c)  # (B, k, C)
        logits, fine_logits = self.decide(coarse_feats, fine, positions)
        index = positions[:, None, :].expand(b, c, k)  # (B, C, k)
        coarse_selected = coarse_feats.flatten(2).gather(2, index).transpose(1, 2)  # (B, k, C)
        return DcnOutput(logits=logits, coarse_logits=coarse_logits, fine_logits=fine_logits, saliency=saliency,
                         positions=positions, boxes=boxes, coarse_selected=coarse_selected, fine_selected=fine)

    def forward(self, x: Tensor, top_k: int | None = None, phase: DcnStep | None = None) -> DcnOutput:
        if self.whole_image:
            return DcnOutput(logits=self.forward_whole_image(x))
        k = phase.top_k if phase is not None else self.top_k if top_k is None else top_k
        coarse_feats = self.coarse_features(x)  # (B, C, h, w)
        coarse_logits = self.head(coarse_feats)  # (B, K)
        if k == 0:
            return DcnOutput(logits=coarse_logits, coarse_logits=coarse_logits)
        n_random = phase.n_random if phase is not None and self.training else 0
        freeze = phase is not None and phase.stage == SELECT
        out = self.refine(x, coarse_feats, coarse_logits, k, n_random, freeze)
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
