"""The one place that turns the recipe's `model` section into plain constructor arguments."""

from __future__ import annotations

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_data_config
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.attention.options import BlockOptions
from fgvc.models.classifier import Classifier, create_backbone
from fgvc.models.cfvit import CFViT
from fgvc.models.dcn import DCN
from fgvc.models.sizes import check_side
from fgvc.models.zoom import RACNN
from fgvc.registry import Registry

# arch name -> builder(model_cfg, num_classes, image_size) -> nn.Module
ARCHS: Registry = Registry("model.arch")


def _drop_path(m: DictConfig) -> dict:
    """timm arguments for the backbones' stochastic depth (model.drop_path), {} when off."""
    return {"drop_path_rate": m.drop_path} if m.drop_path else {}


@ARCHS.register("classifier")
def _classifier(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    a = m.attention
    options = BlockOptions(mlp_bias=a.mlp_bias, spatial_order=a.spatial_order, spatial_norm=a.spatial_norm,
                           spatial_bn_momentum=a.spatial_bn_momentum, spatial_bn_zero_init=a.spatial_bn_zero_init,
                           residual_form=a.residual_form, gate_norm=a.gate_norm, gate_width=a.gate_width)
    return Classifier(m.backbone, num_classes, pretrained=m.pretrained, weights=m.weights, drop_rate=m.drop_rate,
                      attention=a.type, attention_stages=list(a.stages), attention_placement=a.placement,
                      attention_init=a.init, attention_reduction=a.reduction, attention_kernel_size=a.kernel_size,
                      image_size=image_size, stn_count=a.stn_count, stn_sampler=a.stn_sampler,
                      stn_crop_only=a.stn_crop_only, stn_start_scale=a.stn_start_scale,
                      stn_fixed_scale=a.stn_fixed_scale,
                      attention_options=options,
                      backbone_args=backbone_args(m) | _drop_path(m))


@ARCHS.register("racnn")
def _racnn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    z = m.zoom
    return RACNN(m.backbone, num_classes, image_size=image_size, scales=z.scales,
                 share_backbone=z.share_backbone, fuse=z.fuse, min_side=z.min_side,
                 mask_steepness=z.mask_steepness, pretrained=m.pretrained, weights=m.weights,
                 sampler=z.sampler, proposal=z.proposal, backbone_args=backbone_args(m) | _drop_path(m))


@ARCHS.register("dcn")
def _dcn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    d = m.dcn
    if m.weights:  # one file cannot hold two networks; never ignore it silently
        raise UserError("model.weights is not used by model.arch=dcn; give model.dcn.coarse_weights and/or "
                        "model.dcn.fine_weights instead.")
    return DCN(num_classes, image_size=image_size, coarse_backbone=d.coarse_backbone,
               coarse_stages=d.coarse_stages, coarse_image_size=coarse_side(d, image_size),
               fine_backbone=d.fine_backbone, patch_size=d.patch_size, top_k=d.top_k,
               saliency=d.saliency, exit_threshold=d.exit_threshold, whole_image=d.whole_image,
               pretrained=m.pretrained, pool=d.pool, top_layers=d.top_layers,
               coarse_weights=d.coarse_weights, fine_weights=d.fine_weights, top_hidden=d.top_hidden,
               detach_fusion=d.detach_fusion, backbone_args=backbone_args(m) | _drop_path(m))


def coarse_side(dcn_cfg: DictConfig, image_size: int) -> int:
    """The DCN coarse network's input side: model.dcn.coarse_image_size, or half the image's."""
    return dcn_cfg.coarse_image_size or image_size // 2


def backbone_sides(model_cfg: DictConfig, image_size: int) -> list[tuple[str, str, int]]:
    """(recipe key of the side, backbone, input side) of every timm backbone the recipe's model
    builds: the classifier's and RA-CNN's at data.image_size (every RA-CNN scale is read at the input
    size), the DCN's coarse network at its side and fine network at model.dcn.patch_size (with
    whole_image, at data.image_size)."""
    if model_cfg.arch != "dcn":
        return [("data.image_size", model_cfg.backbone, image_size)]
    d = model_cfg.dcn
    coarse_key = "model.dcn.coarse_image_size" if d.coarse_image_size else "data.image_size // 2 (model.dcn.coarse_image_size)"
    fine = ("data.image_size", d.fine_backbone, image_size) if d.whole_image else \
        ("model.dcn.patch_size", d.fine_backbone, d.patch_size)
    return ([] if d.whole_image else [(coarse_key, d.coarse_backbone, coarse_side(d, image_size))]) + [fine]


def check_backbones(model_cfg: DictConfig, image_size: int) -> None:
    """One sentence, before anything is built or written, when a backbone of the recipe cannot
    take the side it would read (fgvc/models/sizes.py; fixed-size transformers are built for it), or
    RA-CNN's rollout proposal is asked of a backbone without a token sequence."""
    for key, backbone, side in backbone_sides(model_cfg, image_size):
        check_side(backbone, side, key, backbone_args(model_cfg))
    if model_cfg.arch == "racnn" and model_cfg.zoom.proposal == "rollout":
        with torch.device("meta"):  # the layout only: no memory, no weights
            net, _ = create_backbone(model_cfg.backbone, 0, False, "", image_size, **backbone_args(model_cfg))
        if fmaps.layout(net) != fmaps.NLC:
            raise UserError(f"model.zoom.proposal=rollout reads the attention rollout of a ViT-family backbone (ViT, "
                            f"DeiT, EVA), and '{model_cfg.backbone}' has no token sequence; use model.zoom.proposal=apn.")


def backbone_args(m: DictConfig) -> dict:
    """`model.backbone_args` as plain Python values for `timm.create_model` (absent in old recipes: {})."""
    args = m.get("backbone_args") or {}
    args = OmegaConf.to_container(args, resolve=True) if isinstance(args, DictConfig) else dict(args)
    for key, value in args.items():
        if ":" in key or value is None:  # `{depth:2}` without a space is YAML for the key 'depth:2'
            raise UserError(f"model.backbone_args has the key '{key}' without a value; write "
                            "model.backbone_args.depth=2 (or {depth: 2} with a space after the colon).")
    return args


@ARCHS.register("cfvit")
def _cfvit(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    c = m.cfvit
    return CFViT(m.backbone, num_classes, image_size, coarse_grid=c.coarse_grid, share=c.share,
                 rank_layers=list(c.rank_layers), rank_decay=c.rank_decay, reuse=c.reuse,
                 exit_threshold=c.exit_threshold, pretrained=m.pretrained, weights=m.weights,
                 drop_rate=m.drop_rate, drop_path=m.drop_path, backbone_args=backbone_args(m))


def build_model(model_cfg: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    """The network a recipe describes. Its `pretrained_names` (a set of parameter names, possibly
    empty) says which parameters came from pretrained weights, its `head_names` which belong to a
    classifier (a linear layer with one output per class: the backbone's, RA-CNN's per scale, the
    DCN's, the gates' and the transformers' heads); its `input_mean` and `input_std` buffers (0..255
    scale, not saved with the weights) normalise uint8 images in `model_input`."""
    model = ARCHS.get(model_cfg.arch)(model_cfg, num_classes, image_size)
    if not hasattr(model, "pretrained_names"):
        model.pretrained_names = set()
    model.head_names = {f"{name}.{p}" for name, mod in model.named_modules()
                        if isinstance(mod, nn.Linear) and mod.out_features == num_classes for p, _ in mod.named_parameters()}
    mean, std = mean_std(data_backbone(model_cfg))
    model.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
    model.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1) * 255, persistent=False)
    return model


def model_input(model: nn.Module, images: Tensor) -> Tensor:
    """The data pipeline's (B, 3, H, W) uint8 images -> float (x - mean) / std on their device, with
    the mean and std `build_model` gave the model (it may be wrapped by DDP). Normalising here rather
    than in the loading processes moves a quarter of the bytes. Float images are taken as already
    normalised and returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return (images.float() - net.input_mean) / net.input_std                    # (B, 3, H, W) float


def mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of the timm model's pretrained configuration."""
    pcfg = timm.models.get_pretrained_cfg(backbone) or timm.models.get_pretrained_cfg(backbone.split(".")[0])
    cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    return tuple(cfg["mean"]), tuple(cfg["std"])


def data_backbone(model_cfg: DictConfig) -> str:
    return model_cfg.dcn.fine_backbone if model_cfg.arch == "dcn" else model_cfg.backbone
