"""Where a model looks: every map a trained fgvc model exposes, at input resolution.

A *map source* is a function `source(model, images, classes) -> {name: (B, H, W)}` returning one or
more maps, each at the network input's resolution (H, W), float, min-max normalised to [0, 1] per
image. Coordinates follow the data pipeline's convention: pixel i covers [i, i + 1), so a map value
at row r, column c sits at (c + 0.5, r + 0.5) in the input pixels boxes and keypoints use.

    cam            class activation map (Zhou et al. 2016) of the class asked for (default: predicted)
    gradcam        Grad-CAM (Selvaraju et al. 2017) of that class, from the `grad-cam` package
    attention      every fgvc gate's spatial map, recorded with forward hooks (AttentionRecorder) and
                   averaged per stage: `cbam_stage3`, `residual_stage2`, `gate_stage1`, ...; the
                   spatial transformer's sampled region as `stn_region`
    zoom           RA-CNN's box per zoom as a window over the input: `zoom1`, `zoom2`
    saliency       the DCN's entropy saliency on the coarse grid: `dcn_saliency`
    rollout        attention rollout (Abnar and Zuidema 2020) of a ViT-family backbone (ViT, DeiT, EVA)
    class_attention  the last layer's class-token attention of a ViT-family backbone (class-agnostic)

CAM and Grad-CAM read every backbone's last map through `fgvc.models.features` (CNNs, Swin, and the
patch-token map of ViTs; class-specific on tokens too). rollout and class_attention need attention
matrices (`fgvc.models.token_attention`, fused attention switched off for the extraction only): a
model without a ViT-family backbone does not list them.

`FAMILY_SOURCES` says which sources each model family has; `compute_maps` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.attention.recorder import AttentionRecorder
from fgvc.models.classifier import Classifier
from fgvc.models.dcn import DCN
from fgvc.models.outputs import final_logits
from fgvc.models.token_attention import attention_maps
from fgvc.models.zoom import RACNN, boxes_xyxy
from fgvc.registry import Registry

# source name -> fn(model, images (B, 3, H, W), classes (B,) long) -> {map name: (B, H, W) in [0, 1]}
MapSource = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]
SOURCES: Registry[MapSource] = Registry("map source")

FAMILY_SOURCES: dict[str, tuple[str, ...]] = {
    "classifier": ("cam", "gradcam", "attention", "rollout", "class_attention"),
    "racnn": ("cam", "gradcam", "zoom", "rollout", "class_attention"),
    "dcn": ("cam", "gradcam", "saliency", "rollout", "class_attention"),
}
TOKEN_SOURCES = ("rollout", "class_attention")  # only for a ViT-family backbone (`token_backbone`)


def model_family(model: nn.Module) -> str:
    """'classifier', 'racnn' or 'dcn': the key into FAMILY_SOURCES."""
    if isinstance(model, RACNN):
        return "racnn"
    if isinstance(model, DCN):
        return "dcn"
    if isinstance(model, Classifier):
        return "classifier"
    raise UserError(f"maps are defined for fgvc's Classifier, RACNN and DCN, not {type(model).__name__}; "
                    "train the model with fgvc/train.py.")


# ---------------------------------------------------------------------------------------------
# Helpers: resolution, normalisation, windows


FLAT_TOLERANCE = 1e-5  # a map whose range is below this share of its magnitude is constant up to
# float rounding (e.g. a 1x1 feature map upsampled): stretching it would draw rounding noise


def normalise(maps: Tensor) -> Tensor:
    """(B, H, W) -> per-image min-max to [0, 1]; a constant map (no preference anywhere) becomes all ones."""
    flat = maps.float().flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = hi - lo
    flat_map = span <= FLAT_TOLERANCE * torch.maximum(hi.abs(), lo.abs()).clamp_min(torch.finfo(flat.dtype).tiny)
    out = torch.where(flat_map, torch.ones_like(flat), (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny))
    return out.view_as(maps)


def to_input(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) or (B, 1, h, w) on a grid covering the whole input -> (B, H, W), bilinear with
    align_corners=False: cell j covers input pixels [j * H / h, (j + 1) * H / h), as strided convs do."""
    if maps.ndim == 3:
        maps = maps[:, None]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return maps[:, 0].float()


def window(u: Tensor, v: Tensor) -> Tensor:
    """A separable window (1 - u^2)_+ (1 - v^2)_+ over normalised coordinates u, v in [-1, 1]: 1 at
    the centre of a region, 0 on and beyond its border. Boxes drawn as maps peak at their centre
    (a flat box has no peak for the pointing game) and keep their energy inside themselves."""
    return (1 - u**2).clamp_min(0) * (1 - v**2).clamp_min(0)


def pixel_centres(height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
    """(H, W) x and y of every pixel centre in input pixels (pixel i covers [i, i + 1))."""
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    return xs[None, :].expand(height, width), ys[:, None].expand(height, width)


def box_window(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 3) squares (centre x, centre y, half side) in input pixels -> (B, H, W) window maps."""
    x, y = pixel_centres(height, width, boxes.device)
    cx, cy, half = (boxes[:, i, None, None].float() for i in range(3))  # each (B, 1, 1)
    return window((x - cx) / half, (y - cy) / half)  # (B, H, W)


def invert_affine(theta: Tensor) -> Tensor:
    """(B, 2, 3) affine p = A u + t -> (B, 2, 3) its inverse u = A^-1 p - A^-1 t."""
    a_inv = torch.linalg.inv(theta[:, :, :2].float())  # (B, 2, 2)
    return torch.cat([a_inv, -a_inv @ theta[:, :, 2:].float()], 2)


def unwarp(maps: Tensor, theta: Tensor) -> Tensor:
    """Maps (B, H, W) in the frame a spatial transformer produced (output pixel u looks at input
    point theta(u)) -> the same maps in the input frame; zero where the transformer did not look."""
    b, h, w = maps.shape
    grid = F.affine_grid(invert_affine(theta), [b, 1, h, w], align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def stn_theta(model: nn.Module, images: Tensor) -> Tensor | None:
    """The STN's affine transforms (B, N, 2, 3), one per window, when the backbone sees only the
    sampled windows, else None.

    With `attention.init=identity` the backbone sees x + gamma * (sampled - x), a blend of two
    frames with no single map back; those maps are left in the input frame."""
    stn = getattr(model, "stn", None)
    if stn is None or stn.gamma is not None:
        return None
    with torch.no_grad():
        return stn.localization(images)  # (B, N, 2, 3)


# ---------------------------------------------------------------------------------------------
# Sources


@SOURCES.register("cam")
def cam(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """CAM (Zhou et al. 2016, `fgvc.models.features.class_activation_maps`) from each model's own
    `class_activation_maps`: the classifier's last features (RA-CNN: the first, whole-image scale;
    DCN: the coarse path)."""
    size = tuple(images.shape[-2:])
    with torch.no_grad():
        if getattr(model, "stn", None) is not None:  # one CAM per window, each in its own frame
            maps = model.window_activation_maps(images)  # (B, N, K, h, w)
            picked = maps[torch.arange(len(classes)), :, classes]  # (B, N, h, w)
            theta = stn_theta(model, images)  # (B, N, 2, 3) or None
            full = sum(unwarp(to_input(picked[:, i], size), theta[:, i]) if theta is not None
                       else to_input(picked[:, i], size) for i in range(picked.shape[1]))
            return {"cam": normalise(full)}
        maps = model.class_activation_maps(images)  # (B, K, h, w)
        picked = maps[torch.arange(len(classes)), classes]  # (B, h, w)
        full = to_input(picked, size)  # (B, H, W)
    return {"cam": normalise(full)}


class _LogitsOnly(nn.Module):
    """grad-cam calls `model(x)` and expects a logits tensor: multi-output models return dataclasses."""

    def __init__(self, model: nn.Module, pick: Callable[[object], Tensor]) -> None:
        super().__init__()
        self.model, self.pick = model, pick

    def forward(self, x: Tensor) -> Tensor:
        return self.pick(self.model(x))


def _gradcam_setup(model: nn.Module, images: Tensor) -> tuple[nn.Module, nn.Module, Callable[[Tensor], Tensor]]:
    """(the module grad-cam reads activations from, a wrapper returning the logits to explain, the
    transform of that module's output into a (B, C, h, w) map: `fgvc.models.features`)."""
    def through(net: nn.Module, x: Tensor) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
        size = tuple(x.shape[-2:])
        return fmaps.gradient_module(net, x[:1]), lambda out: fmaps.to_map(net, out, size).map

    def as_map(out: Tensor) -> Tensor:  # the DCN's feature modules already give (B, C, h, w)
        return out

    if isinstance(model, RACNN):
        # the fusion head reads detached features, so the fused logits carry no gradient back to any
        # backbone: explain the first scale's own logits, read on the whole image
        layer, reshape = through(model.backbones[0], model.first_scale(images))
        return layer, _LogitsOnly(model, lambda out: out.scale_logits[0]), reshape
    if isinstance(model, DCN):
        if model.coarse is None:
            return model.fine, _LogitsOnly(model, final_logits), as_map
        if model.fusion is not None and model.fusion.detach:
            # the fused classifier reads detached vectors: explain the coarse branch's own logits
            return model.coarse, _LogitsOnly(model, lambda out: out.coarse_logits), as_map
        return model.coarse, _LogitsOnly(model, final_logits), as_map
    with torch.no_grad():  # the backbone's input (the spatial transformer's window), for the probe and the grid
        x = images[:1] if model.stn is None else model.stn(images[:1]).flatten(0, 1)
    layer, reshape = through(model.net, x)
    return layer, _LogitsOnly(model, final_logits), reshape


@SOURCES.register("gradcam")
def gradcam(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) of `classes` on the last feature stage, computed by the
    `grad-cam` package (used as a context manager so its hooks are removed). Several spatial
    transformers put N windows through the backbone per image, which grad-cam cannot pair with
    the images: no Grad-CAM for them (their CAM unwarps each window)."""
    if getattr(getattr(model, "stn", None), "count", 1) > 1:
        return {}
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, wrapper, reshape = _gradcam_setup(model, images)
    targets = [ClassifierOutputTarget(int(k)) for k in classes.tolist()]
    with GradCAM(model=wrapper, target_layers=[layer], reshape_transform=reshape) as explainer:
        maps = explainer(input_tensor=images, targets=targets)  # (B, H, W) numpy, resized, in [0, 1]
    full = torch.from_numpy(maps).float().to(images.device)
    theta = stn_theta(model, images)
    if theta is not None:
        full = unwarp(full, theta[:, 0])
    return {"gradcam": normalise(full)}


@SOURCES.register("attention")
def attention(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """Every gate's spatial map, upsampled to the input and averaged over the gates of a stage
    (block placement puts one in every residual block): `{type}_stage{i}`. The spatial transformer
    gives `stn_region`: a window over the input region its sampling grid covers (the largest over
    its windows, with several transformers)."""
    size = tuple(images.shape[-2:])
    kind = getattr(model, "attention_type", "none")
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model(images)
    per_stage: dict[int, list[Tensor]] = {}
    out: dict[str, Tensor] = {}
    for record in recorder.records:
        if record.kind == "spatial":
            per_stage.setdefault(record.stage, []).append(to_input(record.value, size))
        elif record.kind == "theta":
            h, w = size
            x, y = pixel_centres(h, w, images.device)
            u_img = torch.stack([2 * x / w - 1, 2 * y / h - 1], -1)  # (H, W, 2) input point in [-1, 1]
            regions = []
            for i in range(record.value.shape[1]):  # each window of (B, N, 2, 3)
                inv = invert_affine(record.value[:, i])  # (B, 2, 3)
                u = torch.einsum("bij,hwj->bhwi", inv[:, :, :2], u_img) + inv[:, None, None, :, 2]  # (B, H, W, 2)
                regions.append(window(u[..., 0], u[..., 1]))
            out["stn_region"] = normalise(torch.stack(regions).amax(0))
    for stage, maps in sorted(per_stage.items()):
        out[f"{kind}_stage{stage}"] = normalise(torch.stack(maps).mean(0))
    return out


def token_backbone(model: nn.Module, images: Tensor) -> tuple[nn.Module, Tensor] | None:
    """(the ViT-family backbone whose attention explains the model, its input) or None: the
    classifier's backbone, RA-CNN's first scale (the whole image), the DCN's coarse network."""
    if isinstance(model, RACNN):
        net, x = model.backbones[0], model.first_scale(images)
    elif isinstance(model, DCN):
        if model.coarse is None or model.coarse.features_only:
            return None
        net, x = model.coarse.net, model.coarse_input(images)
    elif getattr(model, "stn", None) is not None:
        return None  # the backbone reads the transformer's windows, not the image
    else:
        net, x = model.net, images
    return (net, x) if fmaps.layout(net) == fmaps.NLC else None


def _token_maps(model: nn.Module, images: Tensor, name: str) -> dict[str, Tensor]:
    found = token_backbone(model, images)
    if found is None:
        return {}
    maps = attention_maps(*found)  # each (B, h, w) on the patch grid, which covers the whole input
    return {name: normalise(to_input(maps[name], tuple(images.shape[-2:])))} if name in maps else {}


@SOURCES.register("rollout")
def attention_rollout(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """Attention rollout (Abnar and Zuidema 2020; heads averaged, identity added, rows renormalised,
    no discard) of the class token (DeiT: class and distillation tokens; average-pool heads: every
    patch token), on the patch grid upsampled to the input. Class-agnostic."""
    return _token_maps(model, images, "rollout")


@SOURCES.register("class_attention")
def class_attention(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """The last block's attention from the class token to the patches, averaged over heads. Class-agnostic."""
    return _token_maps(model, images, "class_attention")


@SOURCES.register("zoom")
def zoom_windows(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """RA-CNN's box per zoom (composed into input pixels) as a window map: `zoom1`, `zoom2`."""
    h, w = images.shape[-2:]
    with torch.no_grad():
        out = model(images)
    return {f"zoom{s + 1}": box_window(b, h, w) for s, b in enumerate(out.boxes)}


@SOURCES.register("saliency")
def dcn_saliency(model: nn.Module, images: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """The DCN's saliency ||d H / d f_c|| (Almahairi et al. 2016) on the coarse grid, upsampled;
    the coarse grid covers the whole input (the coarse network reads the image shrunk)."""
    with torch.no_grad():
        out = model(images)
    if out.saliency is None:
        return {}
    return {"dcn_saliency": normalise(to_input(out.saliency, tuple(images.shape[-2:])))}


# ---------------------------------------------------------------------------------------------
# All maps of one batch


@dataclass
class MapOutput:
    maps: dict[str, Tensor]  # map name -> (B, H, W) in [0, 1], input resolution
    logits: Tensor  # (B, K) the model's final prediction
    zoom_boxes: list[Tensor] = field(default_factory=list)  # RA-CNN: per zoom, (B, 4) x1 y1 x2 y2 pixels
    patches: Tensor | None = None  # DCN: (B, k, 4) x1 y1 x2 y2 of the fine patches, input pixels
    skipped: dict[str, str] = field(default_factory=dict)  # default source -> the sentence saying why it has no map


def sources_for(model: nn.Module, wanted: list[str] | None = None) -> list[str]:
    """The model family's sources, or those of `wanted` it has (a UserError names any it lacks)."""
    family = model_family(model)
    have = FAMILY_SOURCES[family]
    if not has_token_backbone(model):
        have = tuple(s for s in have if s not in TOKEN_SOURCES)
    if not wanted:  # by default only the maps the model has; asked for, a missing CAM says why
        return [s for s in have if s != "cam" or has_cam(model)]
    for name in wanted:
        SOURCES.get(name)  # unknown names fail with the list of known ones
        if name in TOKEN_SOURCES and name not in have:
            raise UserError(f"map source '{name}' needs a ViT-family backbone (ViT, DeiT, EVA) with attention matrices; "
                            f"this {family} model has none, so use some of {', '.join(have)}.")
        if name not in have:
            raise UserError(f"map source '{name}' does not exist for {family} models; use some of {', '.join(have)}.")
    return list(wanted)


def has_cam(model: nn.Module) -> bool:
    """Whether the explained classifier is linear on pooled features (`fgvc.models.features.head_relation`)."""
    try:
        if isinstance(model, RACNN):
            fmaps.head_relation(model.backbones[0], model.classifiers[0])
        elif isinstance(model, Classifier) and model.stn_head is None:
            fmaps.head_relation(model.net)
        elif isinstance(model, Classifier):  # one CAM per spatial-transformer window
            return fmaps.pooled_width(model.net) == model.net.num_features
    except UserError:
        return False
    return True


def has_token_backbone(model: nn.Module) -> bool:
    """Whether the model's explained backbone is a ViT family (attention matrices exist)."""
    if isinstance(model, RACNN):
        net = model.backbones[0]
    elif isinstance(model, DCN):
        net = None if model.coarse is None or model.coarse.features_only else model.coarse.net
    else:
        net = None if getattr(model, "stn", None) is not None else getattr(model, "net", None)
    return net is not None and fmaps.layout(net) == fmaps.NLC


def compute_maps(model: nn.Module, images: Tensor, sources: list[str] | None = None,
                 classes: Tensor | None = None) -> MapOutput:
    """Run the model once for its prediction, boxes and patches, then every source on `images`
    (B, 3, H, W). Class maps explain `classes` (B,), by default the predicted classes."""
    model.eval()
    with torch.no_grad():
        out = model(images)
    logits = final_logits(out)
    if classes is None:
        classes = logits.argmax(1)
    maps: dict[str, Tensor] = {}
    skipped: dict[str, str] = {}
    for name in sources_for(model, sources):
        try:
            maps.update(SOURCES.get(name)(model, images, classes))
        except UserError as err:  # asked for by name: say why; among the defaults: leave it out
            if sources:
                raise
            skipped[name] = str(err)
    zoom_boxes = [boxes_xyxy(b) for b in out.boxes] if isinstance(model, RACNN) else []
    patches = out.boxes if isinstance(model, DCN) else None
    return MapOutput(maps, logits, zoom_boxes, patches, skipped)
