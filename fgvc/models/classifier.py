"""A timm backbone with its classifier: the plain fine-grained baseline, optionally with attention
(SE, CBAM, residual attention, attention gates, a spatial transformer or a timm attention block;
see fgvc/models/attention/)."""

from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
from torch import Tensor, nn

from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.attention.gate import GatedStage
from fgvc.models.attention.options import BlockOptions
from fgvc.models.attention.patch import (PROBE_SIDE, Stage, attach_after_stage, attach_in_blocks, backbone_stages,
                                         default_stages, make_block, pick_stages)
from fgvc.models.attention.stn import SpatialTransformer
from fgvc.models.sizes import build_args, fixed_size
from fgvc.models.weights import fit_checkpoint, load_backbone_weights, read_state_dict


TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "features_only", "out_indices")  # not part of the exported model


def create_backbone(name: str, num_classes: int, pretrained: bool = False, weights: str = "", image_size: int = 0,
                    **kwargs) -> tuple[nn.Module, set[str]]:
    """`timm.create_model` with one-sentence errors, built for `image_size`-px inputs (0: timm's
    default; fgvc/models/sizes.py: transformers get their size arguments, position embeddings are
    resampled when weights load). Returns the model and the names of its parameters that came from
    pretrained weights (empty when trained from scratch)."""
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise UserError(f"model.backbone '{name}' is not a timm model; try one of {close or 'timm.list_models()'}.")
    kwargs = {**build_args(name, image_size), **kwargs}
    try:
        model = timm.create_model(name, pretrained=pretrained and not weights, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument the architecture does not take
        extra = sorted(set(kwargs) - set(TRAINING_ONLY_ARGS))
        raise UserError(f"timm '{name}' does not accept the arguments {extra} of model.backbone_args "
                        f"({str(err).splitlines()[0]}); remove them or check the architecture's signature.") from None
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise UserError(f"pretrained weights for '{name}' cannot be fetched ({err.__class__.__name__}); "
                            "connect to the Hugging Face hub, give a local file as model.weights, "
                            "or set model.pretrained=false.") from None
        raise
    # how timm alone rebuilds this network (the export's config.json `model_args`); dropout rates only train
    model.fgvc_model_args = {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_ARGS}
    head = model.pretrained_cfg.get("classifier", "fc")
    head_prefixes = tuple(head) if isinstance(head, (list, tuple)) else (head,)
    loaded: set[str] = set()
    if weights:
        load_backbone_weights(model, fit_checkpoint(model, read_state_dict(weights)), skip_prefixes=head_prefixes)
    if weights or pretrained:
        loaded = {n for n, _ in model.named_parameters() if not n.startswith(head_prefixes)}
    return model, loaded


class Classifier(nn.Module):
    """Backbone features -> global pool -> linear classifier, all timm's, with optional attention.

    Attention (`attention` = none | se | cbam | residual | gate | stn | a timm attention name):
    - se, cbam, residual, timm names: after the stages `attention_stages` (indices into timm's
      feature_info; `attention_placement="stage"`) or inside every residual block of those stages
      (`"block"`). Backbone parameter names never change; `pretrained_names` lists only the
      backbone's, so the new blocks get the trainer's `new_lr_mult`.
    - gate: the deepest feature map gates each of `attention_stages` (shallower stages; the deepest
      itself, if listed, is the gating signal and not gated); the logits add a linear classifier on
      every attention-pooled stage to the backbone's own.
    - stn: a spatial transformer resamples the image before the backbone, sampling its window from
      the full-resolution input at `image_size`; with `stn_count` = N > 1, N windows go through the
      one backbone and a linear classifier reads their N pooled features concatenated;
      `stn_sampler` (SpatialTransformer's `sampler`): the paper's bilinear grid, or "antialias";
      `stn_crop_only`: windows never larger than the image (SpatialTransformer's `crop_only`);
      `stn_start_scale`: the window's side at initialisation (SpatialTransformer's `start_scale`), kept
      throughout with `stn_fixed_scale`.
    Empty `attention_stages` = the method's default stages (`patch.default_stages`). `attention_options`:
    the per-method options (`BlockOptions`: SE's and CBAM's, residual attention's form, the gates').
    `attention_init="identity"` starts every method as the identity, so at initialisation the network
    computes exactly the plain backbone's logits (see each block's docstring for how; the antialiased
    spatial transformer: up to the sampling grid's float rounding).
    """

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, weights: str = "",
                 drop_rate: float = 0.0, attention: str = "none", attention_stages: Sequence[int] = (),
                 attention_placement: str = "stage", attention_init: str = "default", attention_reduction: int = 16,
                 attention_kernel_size: int = 7, image_size: int = 224, stn_count: int = 1,
                 stn_sampler: str = "bilinear", stn_crop_only: bool = False, stn_start_scale: float = 1.0,
                 stn_fixed_scale: bool = False, backbone_args: dict[str, Any] | None = None,
                 attention_options: BlockOptions | None = None) -> None:
        super().__init__()
        windows = stn_count if attention == "stn" else 1
        # several windows: the backbone only pools, the classifier over their concatenation is `stn_head`
        self.net, names = create_backbone(backbone, num_classes if windows == 1 else 0, pretrained, weights,
                                          image_size, drop_rate=drop_rate, **(backbone_args or {}))
        self.pretrained_names = {f"net.{n}" for n in names}
        self.attention_type = attention
        self.attention = nn.ModuleDict()  # stage blocks: "stage{i}" -> block run after stage i
        self.gated = nn.ModuleDict()  # attention gates: "stage{i}" -> GatedStage
        self.stn: SpatialTransformer | None = None
        self.stn_head: nn.Linear | None = None  # (N*C -> K) with N > 1 parallel transformers
        self.gate_stages: list[int] = []
        if attention == "none":
            return
        identity = attention_init == "identity"
        if attention == "stn":  # (fgvc.config.validate: only placement=stage)
            self.stn = SpatialTransformer(image_size, count=windows, identity_init=identity, sampler=stn_sampler,
                                          crop_only=stn_crop_only, start_scale=stn_start_scale,
                                          fixed_scale=stn_fixed_scale)
            if windows > 1:
                channels = fmaps.pooled_width(self.net)
                self.stn_head = nn.Linear(windows * channels, num_classes)
                if identity:  # windows start identical: only the first is read, as a plain classifier would
                    nn.init.zeros_(self.stn_head.weight[:, channels:])
            return
        options = attention_options or BlockOptions()
        probe = image_size if fixed_size(backbone) else PROBE_SIDE  # a transformer probes at the side it is built for
        all_stages = backbone_stages(self.net, backbone, probe)
        if attention_stages:
            stages = pick_stages(all_stages, list(attention_stages), backbone)
        else:
            stages = default_stages(attention, all_stages)
        if attention == "gate":
            self._add_gates(stages, all_stages[-1], num_classes, identity, options)
            return
        for stage in stages:

            def make(channels: int, in_channels: int, in_reduction: int, stage: Stage = stage) -> nn.Module:
                side = max(1, image_size // stage.reduction)  # feature-map side at the recipe's image size
                in_side = max(1, image_size // in_reduction) if in_reduction else side  # the trunk input's
                block = make_block(attention, channels, side, attention_reduction, attention_kernel_size, identity,
                                   inplace=attention_placement == "block", options=options,
                                   in_channels=in_channels or channels, in_side=in_side)
                block.fgvc_stage = stage.index  # read by the AttentionRecorder
                return block

            if attention_placement == "stage":
                block = make(stage.channels, stage.in_channels, stage.in_reduction)
                self.attention[f"stage{stage.index}"] = block
                attach_after_stage(self.net, stage, block)
            else:
                attach_in_blocks(self.net, stage, backbone, make, probe)

    def _add_gates(self, stages: list[Stage], deepest: Stage, num_classes: int, identity: bool,
                   options: BlockOptions) -> None:
        """(fgvc.config.validate: only placement=stage). The deepest stage is the gating signal: listed
        among the stages, it is not gated itself."""
        stages = [s for s in stages if s.index != deepest.index]
        if not stages:
            raise UserError(f"model.attention.type=gate gates shallower stages with the deepest one "
                            f"({deepest.module}), and no other stage is listed; leave model.attention.stages "
                            "empty for the default, or give e.g. [-3, -2].")
        g_channels = self.net.num_features
        for stage in stages:
            gated = GatedStage(stage.channels, g_channels, num_classes, identity_init=identity,
                               norm=options.gate_norm, width=options.gate_width)
            gated.gate.fgvc_stage = stage.index
            self.gated[f"stage{stage.index}"] = gated
            self.gate_stages.append(stage.index)

    def features(self, x: Tensor) -> fmaps.SpatialFeatures:
        """The backbone's last features through the one owner (fgvc/models/features.py): `.map`
        (B*N, C, h, w), window-major per image; `.native` is what the backbone's head reads."""
        if self.stn is not None:
            x = self.stn(x).flatten(0, 1)  # (B, N, 3, S, S) -> (B*N, 3, S, S)
        return fmaps.spatial_features(self.net, x)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, num_classes)
        if self.stn_head is not None:
            pooled = self.net.forward_head(self.features(x).native, pre_logits=True)  # (B*N, C)
            return self.stn_head(pooled.view(x.shape[0], -1))  # (B, N*C) -> (B, num_classes)
        if not self.gate_stages:
            return self.net.forward_head(self.features(x).native)
        last, maps = fmaps.intermediate_maps(self.net, x, self.gate_stages)
        g = last.map  # (B, C, h, w) the gating signal
        logits = self.net.forward_head(last.native)  # (B, num_classes)
        for index, x_l in zip(self.gate_stages, maps):
            logits = logits + self.gated[f"stage{index}"](x_l, g)
        return logits

    def class_activation_maps(self, x: Tensor) -> Tensor:
        """CAM (Zhou et al. 2016): the backbone's head relation applied at every position of its last
        map, (B, K, h, w) (`fgvc.models.features.class_activation_maps`; on a token map it is
        class-specific too). With attention gates, the backbone's own classifier only. With N > 1
        spatial transformers: see `window_activation_maps`."""
        if self.stn_head is not None:
            raise UserError("a model with several spatial transformers has one CAM per window; use "
                            "Classifier.window_activation_maps.")
        head = fmaps.head_relation(self.net)
        feats = self.features(x)
        cams = fmaps.class_activation_maps(feats, head)  # (B, K, h, w)
        if not self.training:
            fmaps.check_cam(cams, self.net.forward_head(feats.native), head, self.net)
        return cams

    def window_activation_maps(self, x: Tensor) -> Tensor:
        """CAM of each spatial-transformer window, in that window's frame: (B, N, K, h, w). Window i's
        block of the concatenated classifier applied at every position of its feature map."""
        if self.stn_head is None:
            return self.class_activation_maps(x)[:, None]  # (B, 1, K, h, w)
        if fmaps.pooled_width(self.net) != self.net.num_features:
            raise UserError(f"backbone '{type(self.net).__name__}' has a hidden layer between its pool and classifier, "
                            "so its windows have no class activation map; use another backbone for CAMs.")
        n = self.stn.count
        feats = self.features(x).map  # (B*N, C, h, w)
        weight = self.stn_head.weight.view(self.stn_head.out_features, n, -1)  # (K, N, C)
        feats = feats.view(x.shape[0], n, *feats.shape[1:])  # (B, N, C, h, w)
        bias = self.stn_head.bias[None, None, :, None, None] / n  # the bias shared among the windows
        return torch.einsum("bnchw,knc->bnkhw", feats, weight) + bias
