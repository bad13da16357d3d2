"""A timm backbone with its classifier: the plain fine-grained baseline."""

from __future__ import annotations

import timm
import torch
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models.weights import load_backbone_weights, read_state_dict


def create_backbone(name: str, num_classes: int, pretrained: bool = False, weights: str = "",
                    **kwargs) -> tuple[nn.Module, set[str]]:
    """`timm.create_model` with one-sentence errors. Returns the model and the names of its
    parameters that came from pretrained weights (empty when trained from scratch)."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise UserError(f"model.backbone '{name}' is not a timm model; try one of {close or 'timm.list_models()'}.")
    try:
        model = timm.create_model(name, pretrained=pretrained and not weights, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise UserError(f"pretrained weights for '{name}' cannot be fetched ({err.__class__.__name__}); "
                            "connect to the Hugging Face hub, give a local file as model.weights, "
                            "or set model.pretrained=false.") from None
        raise
    head = model.pretrained_cfg.get("classifier", "fc")
    head_prefixes = tuple(head) if isinstance(head, (list, tuple)) else (head,)
    loaded: set[str] = set()
    if weights:
        load_backbone_weights(model, read_state_dict(weights), skip_prefixes=head_prefixes)
    if weights or pretrained:
        loaded = {n for n, _ in model.named_parameters() if not n.startswith(head_prefixes)}
    return model, loaded


class Classifier(nn.Module):
    """Backbone features -> global pool -> linear classifier, all timm's."""

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, weights: str = "",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.net, names = create_backbone(backbone, num_classes, pretrained, weights, drop_rate=drop_rate)
        self.pretrained_names = {f"net.{n}" for n in names}

    def features(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, h, w)
        return self.net.forward_features(x)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, num_classes)
        return self.net.forward_head(self.features(x))

    def class_activation_maps(self, x: Tensor) -> Tensor:
        """CAM (Zhou et al. 2016): classifier weights applied at every position, (B, K, h, w)."""
        feats = self.features(x)
        fc = self.net.get_classifier()
        if not isinstance(fc, nn.Linear):
            raise UserError("class activation maps need a linear classifier on pooled features; use Grad-CAM.")
        return torch.einsum("bchw,kc->bkhw", feats, fc.weight) + fc.bias[None, :, None, None]
