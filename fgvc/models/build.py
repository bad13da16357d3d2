"""The one place that turns the recipe's `model` section into plain constructor arguments."""

from __future__ import annotations

from omegaconf import DictConfig
from torch import nn

from fgvc.errors import UserError
from fgvc.registry import Registry

# arch name -> builder(model_cfg, num_classes, image_size) -> nn.Module
ARCHS: Registry = Registry("model.arch")


@ARCHS.register("classifier")
def _classifier(m: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    from fgvc.models.classifier import Classifier

    a = m.attention
    return Classifier(m.backbone, num_classes, pretrained=m.pretrained, weights=m.weights, drop_rate=m.drop_rate,
                      attention=a.type, attention_stages=list(a.stages), attention_placement=a.placement,
                      attention_init=a.init, attention_reduction=a.reduction, attention_kernel_size=a.kernel_size,
                      image_size=image_size)


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
    if m.weights:  # one file cannot hold two networks; never ignore it silently
        raise UserError("model.weights is not used by model.arch=dcn; give model.dcn.coarse_weights and/or "
                        "model.dcn.fine_weights instead.")
    return DCN(num_classes, image_size=image_size, coarse_backbone=d.coarse_backbone,
               coarse_stages=d.coarse_stages, coarse_image_size=d.coarse_image_size or image_size // 2,
               fine_backbone=d.fine_backbone, patch_size=d.patch_size, top_k=d.top_k,
               saliency=d.saliency, exit_threshold=d.exit_threshold, whole_image=d.whole_image,
               pretrained=m.pretrained, coarse_weights=d.coarse_weights, fine_weights=d.fine_weights)


def build_model(model_cfg: DictConfig, num_classes: int, image_size: int) -> nn.Module:
    """The network a recipe describes. Its `pretrained_names` (a set of parameter names, possibly
    empty) says which parameters came from pretrained weights."""
    model = ARCHS.get(model_cfg.arch)(model_cfg, num_classes, image_size)
    if not hasattr(model, "pretrained_names"):
        model.pretrained_names = set()
    return model
