"""The one place that turns the recipe's `model` section into plain constructor arguments."""

from __future__ import annotations

import timm
import torch
from omegaconf import DictConfig
from timm.data import resolve_data_config
from torch import Tensor, nn

from fgvc.errors import UserError
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
                      image_size=image_size, stn_count=a.stn_count, stn_sampler=a.stn_sampler,
                      stn_crop_only=a.stn_crop_only,
                      attention_options=options,
                      backbone_args={"drop_path_rate": m.drop_path} if m.drop_path else None)


@ARCHS.register("racnn")
def _racnn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.zoom import RACNN

    z = m.zoom
    return RACNN(m.backbone, num_classes, image_size=image_size, scales=z.scales,
                 share_backbone=z.share_backbone, fuse=z.fuse, min_side=z.min_side,
                 mask_steepness=z.mask_steepness, pretrained=m.pretrained, weights=m.weights,
                 sampler=z.sampler)


@ARCHS.register("dcn")
def _dcn(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.dcn import DCN

    d = m.dcn
    if m.weights:  # one file cannot hold two networks; never ignore it silently
        raise UserError("model.weights is not used by model.arch=dcn; give model.dcn.coarse_weights and/or "
                        "model.dcn.fine_weights instead.")
    return DCN(num_classes, image_size=image_size, coarse_backbone=d.coarse_backbone,
               coarse_stages=d.coarse_stages, coarse_image_size=d.coarse_image_size or image_size // 2,
               fine_backbone=d.fine_backbone, patch_size=d.patch_size, top_k=d.top_k,
               saliency=d.saliency, exit_threshold=d.exit_threshold, whole_image=d.whole_image,
               pretrained=m.pretrained, pool=d.pool, top_layers=d.top_layers,
               coarse_weights=d.coarse_weights, fine_weights=d.fine_weights, top_hidden=d.top_hidden,
               detach_fusion=d.detach_fusion)


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
