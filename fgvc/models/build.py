"""The one place that turns the recipe's `model` section into plain constructor arguments."""

from __future__ import annotations

import timm
from omegaconf import DictConfig
from timm.data import resolve_data_config
from torch import nn

from fgvc.registry import Registry

# arch name -> builder(model_cfg, num_classes, image_size) -> nn.Module
ARCHS: Registry = Registry("model.arch")


@ARCHS.register("classifier")
def _classifier(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.attention.options import BlockOptions
    from fgvc.models.classifier import Classifier

    a = m.attention
    options = BlockOptions(mlp_bias=a.mlp_bias, spatial_order=a.spatial_order, spatial_norm=a.spatial_norm,
                           spatial_bn_momentum=a.spatial_bn_momentum, spatial_bn_zero_init=a.spatial_bn_zero_init,
                           residual_form=a.residual_form, gate_norm=a.gate_norm, gate_width=a.gate_width)
    return Classifier(m.backbone, num_classes, pretrained=m.pretrained, weights=m.weights, drop_rate=m.drop_rate,
                      attention=a.type, attention_stages=list(a.stages), attention_placement=a.placement,
                      attention_init=a.init, attention_reduction=a.reduction, attention_kernel_size=a.kernel_size,
                      image_size=image_size, stn_count=a.stn_count, attention_options=options)


@ARCHS.register("racnn")
def _racnn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.zoom import RACNN

    z = m.zoom
    return RACNN(m.backbone, num_classes, image_size=image_size, scales=z.scales,
                 share_backbone=z.share_backbone, fuse=z.fuse, min_side=z.min_side,
                 mask_steepness=z.mask_steepness, pretrained=m.pretrained, weights=m.weights)


@ARCHS.register("dcn")
def _dcn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.dcn import DCN

    d = m.dcn
    return DCN(num_classes, image_size=image_size, coarse_backbone=d.coarse_backbone,
               coarse_stages=d.coarse_stages, coarse_image_size=d.coarse_image_size or image_size // 2,
               fine_backbone=d.fine_backbone, patch_size=d.patch_size, top_k=d.top_k,
               saliency=d.saliency, exit_threshold=d.exit_threshold, whole_image=d.whole_image,
               pretrained=m.pretrained, pool=d.pool, top_layers=d.top_layers)


def build_model(model_cfg: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    """The network a recipe describes. Its `pretrained_names` (a set of parameter names, possibly
    empty) says which parameters came from pretrained weights."""
    model = ARCHS.get(model_cfg.arch)(model_cfg, num_classes, image_size)
    if not hasattr(model, "pretrained_names"):
        model.pretrained_names = set()
    return model


def mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of the timm model's pretrained configuration."""
    pcfg = timm.models.get_pretrained_cfg(backbone) or timm.models.get_pretrained_cfg(backbone.split(".")[0])
    cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    return tuple(cfg["mean"]), tuple(cfg["std"])


def data_backbone(model_cfg: DictConfig) -> str:
    return model_cfg.dcn.fine_backbone if model_cfg.arch == "dcn" else model_cfg.backbone
