"""RA-CNN: Recurrent Attention Convolutional Neural Network (Fu, Zheng and Mei, CVPR 2017).

Each scale s classifies its image X_s; an attention proposal network (APN) reads the scale's last
feature map and predicts a square box (t_x, t_y, t_l) = (centre x, centre y, half side); the next
scale's image is that box, cut out with the paper's boxcar mask and enlarged to the input size:

    M(x, y) = [h(x - t_x(tl)) - h(x - t_x(br))] * [h(y - t_y(tl)) - h(y - t_y(br))],  h(z) = sigmoid(k z)
    X_{s+1} = resample(X * M_{s+1}, B_{s+1}),  B_{s+1} = B_s o box_s      (paper eq. 4-5)

Every scale is cut ONCE from the full-resolution original X by the composed box B_{s+1} (the APN's
box, given in the frame of scale s, mapped back into the original's frame), never from the previous
scale's already enlarged image: the finest scale is resampled once, and when the data pipeline
delivers an image larger than the network input (`data.full_resolution` > 1) the zooms read pixels
the first scale, X shrunk to the input size, never had. Composing two boxes and cutting once equals
cutting twice (tests/test_zoom.py), up to the second resampling it saves.

Training (paper sec. 3.3-3.4):
    L = sum_s L_cls(Y_s, Y*) + sum_s L_rank(p_t^(s), p_t^(s+1)),
    L_rank = max(0, p_t^(s) - p_t^(s+1) + margin)                       (paper eq. 8-9)
(the loss, `ZoomLoss`, lives in fgvc/engine/losses.py) with the schedule of `ZoomSchedule`: first
the classifiers learn with boxes fixed at the strongest response of the previous scale's feature map
(while each APN is regressed toward that box, which is how we pretrain the APNs), then `cls_steps`
classification updates (boxes fixed) alternate with `apn_steps` proposal updates (ranking loss only;
backbones and classifiers untouched). The schedule has one owner, the training loop: it asks
`ZoomSchedule.phase(update)` and passes the phase to `RACNN.forward`; the loss reads it from the output.

Boxes are kept in *fractions of the current scale's side* internally (so they do not depend on pixel
sizes); `ZoomOutput.boxes` gives them composed back into the pixels of the image `forward` received.
The APN's boxes are squares, (B, 3) centre x, centre y, half side; RAMS-Trans's rollout boxes
(`proposal="rollout"`, see `RACNN`) are rectangles, (B, 4) centre x, centre y, half width, half
height, stretched to the square input as its code does (`box_halves` reads either).

The box floor `min_side` (2/3 by default) is relative to the current scale, as in the reference
implementations (half side >= 1/3 of the scale): the third scale still covers at least 4/9 of the
original side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.classifier import create_backbone
from fgvc.models.resample import mip_mix, shrink
from fgvc.models.token_attention import patch_scores, rollout, unfused_attention

INIT_HALF_SIDE = 0.25  # initial box: a square of half the image side (paper sec. 3.4), as a half side
APN_CHANNELS = 64  # 1x1 conv width before the APN's fully connected layers (keeps them small for ResNet-50)
APN_GRID = 14  # feature grid the APN reads: VGG-19's conv5_4 at 448 px is 14x14 (the paper's input)
APN_HIDDEN = 512  # width of the APN's hidden fully connected layer

# training phases (`zoom_phase`); JOINT = no schedule (evaluation)
PRETRAIN, CLS, APN, JOINT = "pretrain", "cls", "apn", "joint"
APN_PROPOSAL, ROLLOUT = "apn", "rollout"  # what proposes the zooms (model.zoom.proposal)
PROPOSALS = (APN_PROPOSAL, ROLLOUT)
ROLLOUT_THRESHOLD = 1.2  # RAMS-Trans: cells above 1.2 x the rollout map's mean (alpha in its code)


# ---------------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True)
class ZoomSchedule:
    """How training alternates (paper sec. 3.4); counted in optimizer updates."""

    pretrain_updates: int = 0  # classifiers with boxes fixed at the peak response; APNs regress to them
    cls_steps: int = 20  # then: classification updates with the APN's boxes held fixed
    apn_steps: int = 10  # alternating with: proposal updates on the ranking loss only

    def phase(self, update: int) -> str:
        return zoom_phase(update, self.pretrain_updates, self.cls_steps, self.apn_steps)


def zoom_phase(update: int, pretrain_updates: int, cls_steps: int, apn_steps: int) -> str:
    """PRETRAIN for the first `pretrain_updates`, then cycles of `cls_steps` CLS and `apn_steps` APN."""
    if update < pretrain_updates:
        return PRETRAIN
    if apn_steps <= 0:
        return CLS
    if cls_steps <= 0:
        return APN
    return CLS if (update - pretrain_updates) % (cls_steps + apn_steps) < cls_steps else APN


# ---------------------------------------------------------------------------------------------
# Boxes and the differentiable zoom (all batched; boxes are (B, 3) cx, cy, half side in fractions)


def box_from_raw(raw: Tensor, min_side: float) -> Tensor:
    """(B, 3) unconstrained APN output -> (B, 3) box inside the image with side >= min_side.

    half side  t_l = min_side/2 + (1/2 - min_side/2) * sigmoid(raw_l)   in [min_side/2, 1/2]
    centre     t_c = t_l + (1 - 2 t_l) * sigmoid(raw_c)                  in [t_l, 1 - t_l]
    """
    floor = min_side / 2
    half = floor + (0.5 - floor) * torch.sigmoid(raw[:, 2:3])  # (B, 1)
    centre = half + (1 - 2 * half) * torch.sigmoid(raw[:, :2])  # (B, 2)
    return torch.cat([centre, half], dim=1)  # (B, 3)


def peak_response_box(feats: Tensor, half_side: float) -> Tensor:
    """(B, C, h, w) -> (B, 3): a square of `half_side` centred on the cell with the strongest summed
    response (paper sec. 3.4), shifted to lie inside the image. Not differentiable (an argmax)."""
    b, _, h, w = feats.shape
    response = feats.detach().sum(1).flatten(1)  # (B, h*w)
    peak = response.argmax(1)  # (B,)
    cx = ((peak % w).to(feats.dtype) + 0.5) / w
    cy = (torch.div(peak, w, rounding_mode="floor").to(feats.dtype) + 0.5) / h
    centre = torch.stack([cx, cy], 1).clamp(half_side, 1 - half_side)  # (B, 2)
    return torch.cat([centre, centre.new_full((b, 1), half_side)], 1)  # (B, 3)


def box_halves(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """(B, 3) squares (cx, cy, half side) or (B, 4) rectangles (cx, cy, half width, half height) ->
    the half width and half height, each (B, 1)."""
    return boxes[:, 2:3], boxes[:, 3:4] if boxes.shape[1] == 4 else boxes[:, 2:3]


def attention_mask(boxes: Tensor, height: int, width: int, steepness: float) -> Tensor:
    """The paper's boxcar M(x, y) of steep sigmoids (eq. 5), k = steepness per pixel: (B, 1, H, W).

    Pixel i covers [i, i+1) and is judged at its centre i + 0.5; box edges are at (c -/+ l) * side."""
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5  # (W,)
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5  # (H,)
    cx, cy = boxes[:, 0:1], boxes[:, 1:2]  # each (B, 1)
    half_w, half_h = box_halves(boxes)
    mx = torch.sigmoid(steepness * (xs - (cx - half_w) * width)) - torch.sigmoid(steepness * (xs - (cx + half_w) * width))
    my = torch.sigmoid(steepness * (ys - (cy - half_h) * height)) - torch.sigmoid(steepness * (ys - (cy + half_h) * height))
    return (my[:, :, None] * mx[:, None, :]).unsqueeze(1)  # (B, 1, H, W)


def zoom(images: Tensor, boxes: Tensor, out_size: int, steepness: float, sampler: str = "bilinear") -> Tensor:
    """Mask `images` (B, C, H, W) with the boxcar of `boxes` and enlarge each box to out_size^2
    by bilinear sampling: (B, C, out_size, out_size). Gradients reach the boxes through both the
    mask (the paper's derivation) and the sampling positions.

    Sampling positions are kept between the first and last pixel centre inside the box, so that for
    a box on pixel edges and a steep mask this equals `F.interpolate(crop, out_size, mode="bilinear",
    align_corners=False)` of the hard crop (which repeats the crop's border pixels when enlarging).

    `sampler="antialias"`: a box wider than out_size source pixels is not sampled by skipping pixels
    (a moire of detail finer than the output's pixels, which the antialiased first scale does not
    show) but mixed with the box read at the image's full side and shrunk (`resample.mip_mix`)."""
    b, c, h, w = images.shape
    masked = images * attention_mask(boxes, h, w, steepness)  # (B, C, H, W)
    cx, cy = boxes[:, 0], boxes[:, 1]  # (B,)
    half_w, half_h = (half[:, 0] for half in box_halves(boxes))  # (B,) each; equal for squares
    zero = torch.zeros_like(cx)
    # affine map from the output grid [-1, 1]^2 to the box, in grid_sample's normalised coordinates
    theta = torch.stack([torch.stack([2 * half_w, zero, 2 * cx - 1], 1),
                         torch.stack([zero, 2 * half_h, 2 * cy - 1], 1)], 1)  # (B, 2, 3)
    # first/last pixel centre inside the box, in normalised coordinates (pixel centre i+0.5 -> 2(i+0.5)/W - 1)
    lo = torch.stack([2 * (cx - half_w) - 1 + 1 / w, 2 * (cy - half_h) - 1 + 1 / h], 1)[:, None, None, :]  # (B,1,1,2)
    hi = torch.stack([2 * (cx + half_w) - 1 - 1 / w, 2 * (cy + half_h) - 1 - 1 / h], 1)[:, None, None, :]

    def read(side: int) -> Tensor:  # the box sampled at side x side: (B, C, side, side)
        grid = F.affine_grid(theta, [b, c, side, side], align_corners=False)  # (B, side, side, 2)
        grid = torch.maximum(torch.minimum(grid, hi), lo)
        return F.grid_sample(masked, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if sampler == "antialias" and w > out_size:  # box side in source pixels: 2 half W (a rectangle: its longer)
        return mip_mix(read(out_size), read(w), torch.maximum(2 * half_w * w, 2 * half_h * h))
    return read(out_size)


def compose_boxes(outer: Tensor, inner: Tensor) -> Tensor:
    """A box `inner` given in fractions of the crop `outer` -> the same box in fractions of the
    image `outer` was cut from: (B, 3) when both are squares, else (B, 4) (`box_halves`)."""
    side = 2 * torch.cat(box_halves(outer), 1)  # (B, 2) crop width and height as fractions of the image
    centre = outer[:, :2] - side / 2 + side * inner[:, :2]  # (B, 2)
    halves = side * torch.cat(box_halves(inner), 1)  # (B, 2)
    if outer.shape[1] == 3 and inner.shape[1] == 3:
        return torch.cat([centre, halves[:, :1]], 1)  # (B, 3)
    return torch.cat([centre, halves], 1)  # (B, 4)


def boxes_xyxy(boxes: Tensor) -> Tensor:
    """(B, 3) cx, cy, half side or (B, 4) cx, cy, half width, half height -> (B, 4) x1, y1, x2, y2
    (same units)."""
    c, halves = boxes[:, :2], torch.cat(box_halves(boxes), 1)
    return torch.cat([c - halves, c + halves], 1)


# ---------------------------------------------------------------------------------------------
# The rollout box of RAMS-Trans (Hu et al., ACM MM 2021)


def largest_region(mask: Tensor) -> Tensor:
    """(B, h, w) bool -> (B, h, w) bool: the largest 8-connected region of each mask (ties: the one
    met first in raster order, as skimage's `label` + `regionprops` number them); empty stays empty.

    Connected components without leaving the device: every cell starts with its raster index, and
    each step takes the smallest index of its 3 x 3 neighbourhood within the mask; after as many
    steps as a region can be long (h * w) every cell holds its region's first index."""
    b, h, w = mask.shape
    cells = h * w
    inside = mask[:, None]  # (B, 1, h, w)
    index = torch.arange(cells, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    labels = torch.where(inside, index, float(cells))  # background: one past the last index
    for _ in range(cells):
        labels = torch.where(inside, -F.max_pool2d(-labels, 3, stride=1, padding=1), float(cells))
    labels = labels.view(b, cells).long()  # (B, h*w) region label = its first cell, background = cells
    area = torch.zeros(b, cells + 1, device=mask.device).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float32))
    area[:, cells] = 0  # the background is no region
    largest = area.argmax(1, keepdim=True)  # (B, 1) the first of the largest
    return (labels == largest).view(b, h, w) & mask


def rollout_box(scores: Tensor, threshold: float) -> Tensor:
    """RAMS-Trans's box (Hu et al. 2021, its dynamic patch proposal module): the cells of the rollout
    map `scores` (B, h, w) above `threshold` x their mean, the largest connected region, its bounding
    box -> (B, 4) cx, cy, half width, half height in fractions of the map's image. A map with no cell
    above the threshold (a uniform one) gives the whole image."""
    b, h, w = scores.shape
    above = scores > threshold * scores.mean((1, 2), keepdim=True)  # (B, h, w)
    region = largest_region(above)
    rows, cols = region.any(2), region.any(1)  # (B, h), (B, w)
    found = rows.any(1)  # (B,)
    top = rows.int().argmax(1)  # first row of the region
    bottom = h - rows.flip(1).int().argmax(1)  # one past its last row
    left, right = cols.int().argmax(1), w - cols.flip(1).int().argmax(1)
    y1, y2 = torch.where(found, top, 0) / h, torch.where(found, bottom, h) / h  # (B,) fractions
    x1, x2 = torch.where(found, left, 0) / w, torch.where(found, right, w) / w
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2], 1).to(scores.dtype)  # (B, 4)


# ---------------------------------------------------------------------------------------------
# The network


class AttentionProposal(nn.Module):
    """APN (paper sec. 3.2): the scale's last conv features -> stacked fully connected layers ->
    (t_x, t_y, t_l). A 1x1 conv and a pool to at most APN_GRID^2 cells keep the layers small for
    any backbone and input size. The last layer starts at zero: the first box is centred."""

    def __init__(self, channels: int, grid: int, min_side: float) -> None:
        super().__init__()
        self.min_side = min_side
        self.reduce = nn.Sequential(nn.Conv2d(channels, APN_CHANNELS, 1), nn.ReLU(inplace=True),
                                    nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(APN_CHANNELS * grid * grid, APN_HIDDEN), nn.ReLU(inplace=True),
                                nn.Linear(APN_HIDDEN, 3))
        nn.init.zeros_(self.fc[-1].weight)
        nn.init.zeros_(self.fc[-1].bias)

    def forward(self, feats: Tensor) -> Tensor:  # (B, C, h, w) -> (B, 3) box in fractions
        return box_from_raw(self.fc(self.reduce(feats)), self.min_side)


class _ScaleNet(nn.Module):
    """One scale's backbone and classifier as one callable, so that `torch.func.functional_call`
    can run it with detached weights in proposal steps. Built on the fly; owns no new weights."""

    def __init__(self, backbone: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = fmaps.spatial_features(self.backbone, x)  # .map (B, C, h, w), through the one owner
        pooled = self.backbone.forward_head(feats.native, pre_logits=True)  # (B, C)
        return feats.map, pooled, self.classifier(pooled)  # ..., (B, num_classes)


@dataclass
class ZoomOutput:
    logits: Tensor  # (B, K) final prediction: fusion of the scales
    scale_logits: list[Tensor]  # per scale, coarse to fine, each (B, K)
    # per zoom, (B, 3) centre x, centre y, half side in pixels of forward's input (detached); the rollout
    # proposal's rectangles: (B, 4) centre x, centre y, half width, half height (`box_halves`)
    boxes: list[Tensor]
    proposals: list[Tensor]  # per zoom, (B, 3) the APN's box in fractions of that zoom's input (rollout: (B, 4))
    init_boxes: list[Tensor]  # per zoom, (B, 3) the peak-response box, same frame (detached; rollout: the proposal)
    phase: str = JOINT  # the schedule phase this output was computed in

    def named_logits(self) -> dict[str, Tensor]:
        return {f"scale{s}": logits for s, logits in enumerate(self.scale_logits)}

    def zoom_boxes_xyxy(self) -> list[Tensor]:
        """Per zoom, (B, 4) x1, y1, x2, y2 in input-image pixels, for drawing and scoring."""
        return [boxes_xyxy(b) for b in self.boxes]


class RACNN(nn.Module):
    """RA-CNN (Fu et al. 2017) on timm backbones: `scales` backbones (or one shared), a classifier
    per scale, an APN per zoom, and a fusion of the scales' pooled features or summed scores.

    Every backbone family works: the APN reads the scale's last map through the one owner of
    feature maps (fgvc/models/features.py: a CNN's map, a ViT's patch tokens, Swin's NHWC map as
    (B, C, h, w)). `proposal="rollout"` (ViT-family backbones) replaces the APNs by the box of
    RAMS-Trans (Hu et al., ACM MM 2021): the scale's attention rollout (Abnar and Zuidema 2020,
    fgvc/models/token_attention.py) averaged over every token's row as its code does, thresholded at
    ROLLOUT_THRESHOLD x its mean, the bounding box of the largest 8-connected region (`rollout_box`),
    a rectangle cut from the full-resolution image and read at the input size like any zoom. The box
    is not learned: there is nothing to pretrain or alternate, every training phase is CLS. The
    rollout is read in a second forward of the scale without gradient, with timm's fused attention
    switched off for it only (the training forward keeps the fused kernel): about one more forward
    per zoom. `backbone_args`: more timm arguments (e.g. drop_path_rate).
    """

    def __init__(self, backbone: str, num_classes: int, image_size: int = 448, scales: int = 3,
                 share_backbone: bool = False, fuse: str = "features", min_side: float = 2 / 3,
                 mask_steepness: float = 10.0, pretrained: bool = False, weights: str = "",
                 sampler: str = "bilinear", proposal: str = "apn", backbone_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        if proposal not in PROPOSALS:
            raise UserError(f"model.zoom.proposal is '{proposal}'; use one of {', '.join(PROPOSALS)}.")
        self.sampler = sampler  # how a zoom is read from the image: `zoom`
        self.proposal = proposal
        self.num_scales, self.image_size, self.fuse = scales, image_size, fuse
        self.share_backbone, self.mask_steepness = share_backbone, mask_steepness
        self.init_half_side = max(INIT_HALF_SIDE, min_side / 2)

        self.backbones = nn.ModuleList()
        self.pretrained_names: set[str] = set()
        for s in range(1 if share_backbone else scales):
            # num_classes=0: pooled features
            net, names = create_backbone(backbone, 0, pretrained, weights, image_size, **(backbone_args or {}))
            self.backbones.append(net)
            self.pretrained_names |= {f"backbones.{s}.{n}" for n in names}
        if proposal == ROLLOUT and fmaps.layout(self.backbones[0]) != fmaps.NLC:
            raise UserError(f"model.zoom.proposal=rollout reads the attention rollout of a ViT-family backbone (ViT, "
                            f"DeiT, EVA), and '{backbone}' has no token sequence; use model.zoom.proposal=apn.")
        channels = self.backbones[0].num_features  # of the map the APN reads
        width = fmaps.pooled_width(self.backbones[0])  # of the pooled vector the classifiers read
        reduction = fmaps.reduction(self.backbones[0])
        grid = min(APN_GRID, math.ceil(image_size / reduction))
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(scales))
        self.apns = nn.ModuleList(AttentionProposal(channels, grid, min_side)
                                  for _ in range(scales - 1 if proposal == APN_PROPOSAL else 0))
        self.fusion = nn.Linear(scales * width, num_classes) if fuse == "features" else None

    def rollout_scores(self, s: int, image: Tensor) -> Tensor:
        """RAMS-Trans's patch map of scale s: the attention rollout of its backbone on `image`
        (B, 3, S, S), averaged over every token's row, on the patch grid: (B, h, w). No gradient."""
        net = self.backbones[0 if self.share_backbone else s]
        with torch.no_grad(), unfused_attention(net) as recorded:
            net.forward_features(image)
        matrix = rollout(recorded)  # (B, N, N)
        return patch_scores(net, matrix, tuple(image.shape[-2:]), rows=list(range(matrix.shape[1])))  # (B, h, w)

    def _scale(self, s: int, x: Tensor, frozen: bool) -> tuple[Tensor, Tensor, Tensor]:
        net = _ScaleNet(self.backbones[0 if self.share_backbone else s], self.classifiers[s])
        if not frozen:
            return net(x)
        # proposal step: gradients flow through the scale to its input image (and so to the box),
        # never into its weights; BN still normalises with batch statistics as in training
        detached = {n: p.detach() for n, p in net.named_parameters()}
        return torch.func.functional_call(net, detached, (x,))

    def class_activation_maps(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, K, h, w)
        """CAM (Zhou et al. 2016) of the first scale, the one that reads the whole image: its classifier
        through the backbone's head relation (`fgvc.models.features`)."""
        net, fc = self.backbones[0], self.classifiers[0]
        head = fmaps.head_relation(net, fc)
        feats = fmaps.spatial_features(net, self.first_scale(x))
        cams = fmaps.class_activation_maps(feats, head)  # (B, K, h, w)
        if not self.training:
            fmaps.check_cam(cams, fc(net.forward_head(feats.native, pre_logits=True)), head, net)
        return cams

    def first_scale(self, x: Tensor) -> Tensor:
        """X_1: the whole image at the network input size (shrunk, with antialiasing, when the data
        pipeline delivers it larger): (B, 3, H, W) -> (B, 3, S, S)."""
        return shrink(x, self.image_size)

    def forward(self, x: Tensor, phase: str = JOINT) -> ZoomOutput:  # (B, 3, H, W), H = W >= S
        """`phase`: the training loop's `ZoomSchedule.phase(update)`; JOINT (the default) everywhere else."""
        if self.proposal == ROLLOUT and phase in (PRETRAIN, APN):
            phase = CLS  # no proposal network: nothing to pretrain or alternate with
        frozen = phase == APN  # backbones and classifiers are fixed in proposal steps
        image = self.first_scale(x)  # (B, 3, S, S)
        scale_logits, pooled_all, proposals, init_boxes, composed = [], [], [], [], []
        for s in range(self.num_scales):
            feats, pooled, logits = self._scale(s, image, frozen)  # (B, C, h, w), (B, C), (B, K)
            scale_logits.append(logits)
            pooled_all.append(pooled)
            if s == self.num_scales - 1:
                break
            if self.proposal == ROLLOUT:  # RAMS-Trans: a fixed function of the attention, (B, 4) in scale s's frame
                init = proposal = rollout_box(self.rollout_scores(s, image), ROLLOUT_THRESHOLD)
            else:
                with torch.no_grad():
                    init = peak_response_box(feats, self.init_half_side)  # (B, 3) in scale s's frame
                # only proposal steps (and JOINT) let the box's gradient reach the features it was read from
                proposal = self.apns[s](feats if phase in (APN, JOINT) else feats.detach())  # (B, 3) scale s's frame
            if phase == PRETRAIN:  # zoom into the peak-response box while the APN regresses toward it
                box = init
            elif phase == CLS:  # boxes fixed: no gradient to the APN
                box = proposal.detach()
            else:
                box = proposal
            # B_{s+1} = B_s o box: the box in the original's frame; gradients reach every APN before it
            composed.append(box if s == 0 else compose_boxes(composed[-1], box))  # (B, 3)
            image = zoom(x, composed[-1], self.image_size, self.mask_steepness, self.sampler)  # (B, 3, S, S), cut once from x
            proposals.append(proposal if phase == PRETRAIN else proposal.detach())
            init_boxes.append(init)
        # the fusion head reads detached features: it never shapes the backbones
        if self.fusion is not None:  # each scale's descriptor normalised on its own (paper sec. 3.5)
            normed = [F.normalize(p.detach(), dim=1) for p in pooled_all]  # (B, C) each, unit norm
            logits = self.fusion(torch.cat(normed, 1))  # (B, S*C) -> (B, K)
        else:
            logits = torch.stack([y.detach() for y in scale_logits]).sum(0)  # (B, K)
        if phase == APN:  # not in the proposal loss: no path to the fusion weights (DDP unused check)
            logits = logits.detach()
        h, w = x.shape[-2:]
        to_pixels = torch.tensor([w, h, w, h], dtype=x.dtype, device=x.device)  # cx, cy, half width (, half height)
        return ZoomOutput(logits=logits, scale_logits=scale_logits,
                          boxes=[b.detach() * to_pixels[:b.shape[1]] for b in composed],
                          proposals=proposals, init_boxes=init_boxes, phase=phase)
