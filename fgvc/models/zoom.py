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

The box floor `min_side` (2/3 by default) is relative to the current scale, as in the reference
implementations (half side >= 1/3 of the scale): the third scale still covers at least 4/9 of the
original side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.models import features as fmaps
from fgvc.models.classifier import create_backbone
from fgvc.models.resample import mip_mix, shrink

INIT_HALF_SIDE = 0.25  # initial box: a square of half the image side (paper sec. 3.4), as a half side
APN_CHANNELS = 64  # 1x1 conv width before the APN's fully connected layers (keeps them small for ResNet-50)
APN_GRID = 14  # feature grid the APN reads: VGG-19's conv5_4 at 448 px is 14x14 (the paper's input)
APN_HIDDEN = 512  # width of the APN's hidden fully connected layer

# training phases (`zoom_phase`); JOINT = no schedule (evaluation)
PRETRAIN, CLS, APN, JOINT = "pretrain", "cls", "apn", "joint"


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


def attention_mask(boxes: Tensor, height: int, width: int, steepness: float) -> Tensor:
    """The paper's boxcar M(x, y) of steep sigmoids (eq. 5), k = steepness per pixel: (B, 1, H, W).

    Pixel i covers [i, i+1) and is judged at its centre i + 0.5; box edges are at (c -/+ l) * side."""
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5  # (W,)
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5  # (H,)
    cx, cy, half = (boxes[:, i:i + 1] for i in range(3))  # each (B, 1)
    mx = torch.sigmoid(steepness * (xs - (cx - half) * width)) - torch.sigmoid(steepness * (xs - (cx + half) * width))
    my = torch.sigmoid(steepness * (ys - (cy - half) * height)) - torch.sigmoid(steepness * (ys - (cy + half) * height))
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
    cx, cy, half = boxes[:, 0], boxes[:, 1], boxes[:, 2]  # (B,)
    zero = torch.zeros_like(cx)
    # affine map from the output grid [-1, 1]^2 to the box, in grid_sample's normalised coordinates
    theta = torch.stack([torch.stack([2 * half, zero, 2 * cx - 1], 1),
                         torch.stack([zero, 2 * half, 2 * cy - 1], 1)], 1)  # (B, 2, 3)
    # first/last pixel centre inside the box, in normalised coordinates (pixel centre i+0.5 -> 2(i+0.5)/W - 1)
    lo = torch.stack([2 * (cx - half) - 1 + 1 / w, 2 * (cy - half) - 1 + 1 / h], 1)[:, None, None, :]  # (B,1,1,2)
    hi = torch.stack([2 * (cx + half) - 1 - 1 / w, 2 * (cy + half) - 1 - 1 / h], 1)[:, None, None, :]

    def read(side: int) -> Tensor:  # the box sampled at side x side: (B, C, side, side)
        grid = F.affine_grid(theta, [b, c, side, side], align_corners=False)  # (B, side, side, 2)
        grid = torch.maximum(torch.minimum(grid, hi), lo)
        return F.grid_sample(masked, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if sampler == "antialias" and w > out_size:
        return mip_mix(read(out_size), read(w), 2 * half * w)  # box side in source pixels: 2 half W
    return read(out_size)


def compose_boxes(outer: Tensor, inner: Tensor) -> Tensor:
    """A box `inner` given in fractions of the crop `outer` -> the same box in fractions of the
    image `outer` was cut from. Both (B, 3)."""
    side = 2 * outer[:, 2:3]  # (B, 1) crop side as a fraction of the image
    centre = outer[:, :2] - outer[:, 2:3] + side * inner[:, :2]  # (B, 2)
    return torch.cat([centre, side * inner[:, 2:3]], 1)  # (B, 3)


def boxes_xyxy(boxes: Tensor) -> Tensor:
    """(B, 3) cx, cy, half side -> (B, 4) x1, y1, x2, y2 (same units)."""
    c, half = boxes[:, :2], boxes[:, 2:3]
    return torch.cat([c - half, c + half], 1)


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
    boxes: list[Tensor]  # per zoom, (B, 3) centre x, centre y, half side in pixels of forward's input (detached)
    proposals: list[Tensor]  # per zoom, (B, 3) the APN's box in fractions of that zoom's input
    init_boxes: list[Tensor]  # per zoom, (B, 3) the peak-response box, same frame (detached)
    phase: str = JOINT  # the schedule phase this output was computed in

    def named_logits(self) -> dict[str, Tensor]:
        return {f"scale{s}": logits for s, logits in enumerate(self.scale_logits)}

    def zoom_boxes_xyxy(self) -> list[Tensor]:
        """Per zoom, (B, 4) x1, y1, x2, y2 in input-image pixels, for drawing and scoring."""
        return [boxes_xyxy(b) for b in self.boxes]


class RACNN(nn.Module):
    """RA-CNN (Fu et al. 2017) on timm backbones: `scales` backbones (or one shared), a classifier
    per scale, an APN per zoom, and a fusion of the scales' pooled features or summed scores."""

    def __init__(self, backbone: str, num_classes: int, image_size: int = 448, scales: int = 3,
                 share_backbone: bool = False, fuse: str = "features", min_side: float = 2 / 3,
                 mask_steepness: float = 10.0, pretrained: bool = False, weights: str = "",
                 sampler: str = "bilinear", backbone_args: dict | None = None) -> None:
        super().__init__()
        self.sampler = sampler  # how a zoom is read from the image: `zoom`
        self.num_scales, self.image_size, self.fuse = scales, image_size, fuse
        self.share_backbone, self.mask_steepness = share_backbone, mask_steepness
        self.init_half_side = max(INIT_HALF_SIDE, min_side / 2)

        self.backbones = nn.ModuleList()
        self.pretrained_names: set[str] = set()
        for s in range(1 if share_backbone else scales):
            net, names = create_backbone(backbone, 0, pretrained, weights, **(backbone_args or {}))  # 0: pooled features
            self.backbones.append(net)
            self.pretrained_names |= {f"backbones.{s}.{n}" for n in names}
        channels = self.backbones[0].num_features  # of the map the APN reads
        width = fmaps.pooled_width(self.backbones[0])  # of the pooled vector the classifiers read
        reduction = fmaps.reduction(self.backbones[0])
        grid = min(APN_GRID, math.ceil(image_size / reduction))
        self.classifiers = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(scales))
        self.apns = nn.ModuleList(AttentionProposal(channels, grid, min_side) for _ in range(scales - 1))
        self.fusion = nn.Linear(scales * width, num_classes) if fuse == "features" else None

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
        frozen = phase == APN  # backbones and classifiers are fixed in proposal steps
        image = self.first_scale(x)  # (B, 3, S, S)
        scale_logits, pooled_all, proposals, init_boxes, composed = [], [], [], [], []
        for s in range(self.num_scales):
            feats, pooled, logits = self._scale(s, image, frozen)  # (B, C, h, w), (B, C), (B, K)
            scale_logits.append(logits)
            pooled_all.append(pooled)
            if s == self.num_scales - 1:
                break
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
        to_pixels = torch.tensor([w, h, w], dtype=x.dtype, device=x.device)
        return ZoomOutput(logits=logits, scale_logits=scale_logits, boxes=[b.detach() * to_pixels for b in composed],
                          proposals=proposals, init_boxes=init_boxes, phase=phase)
