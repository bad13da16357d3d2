"""The one owner of feature maps (fgvc/models/features.py): (B, C, h, w) from every family, prefix
tokens apart, the CNN maps exactly as before, the head relation behind class activation maps."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from fgvc.analysis.backbones import FAMILIES
from fgvc.errors import UserError
from fgvc.models import features as fmaps

K = 3
CNNS = ["ResNet", "ResNeXt", "ConvNeXt", "EfficientNet", "MobileNetV3", "RegNet"]
TOKENS = ["ViT", "DeiT distilled", "ViT registers", "Swin v1", "Swin v2", "EVA-02"]


def tiny(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    family = FAMILIES[name]
    torch.manual_seed(0)
    net = timm.create_model(family.backbone, pretrained=False, num_classes=K, **family.args, **extra).eval()
    return net, torch.randn(2, 3, family.side, family.side)


@pytest.mark.parametrize("name", CNNS)
def test_a_cnn_map_is_forward_features_itself(name):
    """The CNN path is unchanged: the map IS forward_features' output (same tensor, same values)."""
    net, x = tiny(name)
    with torch.no_grad():
        before = net.forward_features(x)
        feats = fmaps.spatial_features(net, x)
    assert fmaps.layout(net) == fmaps.NCHW and feats.prefix is None
    assert feats.map is feats.native
    assert torch.equal(feats.map, before)


@pytest.mark.parametrize("name", ["ResNet", "EfficientNet", "RegNet", "ResNeXt"])
def test_cnn_cams_equal_the_formula_fgvc_used_before(name):
    """Without a norm after the pool the CAM is the einsum of the classifier on forward_features."""
    net, x = tiny(name)
    with torch.no_grad():
        fc = net.get_classifier()
        before = torch.einsum("bchw,kc->bkhw", net.forward_features(x), fc.weight) + fc.bias[None, :, None, None]
        head = fmaps.head_relation(net)
        cams = fmaps.class_activation_maps(fmaps.spatial_features(net, x), head)
    assert torch.equal(cams, before)


@pytest.mark.parametrize("name", TOKENS)
def test_token_and_nhwc_maps_equal_timms_forward_intermediates(name):
    net, x = tiny(name)
    with torch.no_grad():
        feats = fmaps.spatial_features(net, x)
        timm_map = net.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]
        logits = net(x)
    assert feats.map.shape == (2, net.num_features, *timm_map.shape[-2:])
    torch.testing.assert_close(feats.map, timm_map, rtol=0, atol=1e-6)
    assert torch.equal(net.forward_head(feats.native), logits)  # the head reads the native output


@pytest.mark.parametrize("name,names", [("ViT", ["class"]), ("DeiT distilled", ["class", "distillation"]),
                                        ("ViT registers", ["class", "register1", "register2", "register3",
                                                           "register4"]),
                                        ("EVA-02", ["class"]), ("Swin v1", []), ("ResNet", [])])
def test_prefix_tokens_are_kept_apart_and_named(name, names):
    net, x = tiny(name)
    with torch.no_grad():
        feats = fmaps.spatial_features(net, x)
    assert fmaps.prefix_names(net) == names
    if names:
        assert feats.prefix.shape == (2, len(names), net.num_features)
        torch.testing.assert_close(feats.prefix, net.forward_features(x)[:, :len(names)])
    else:
        assert feats.prefix is None


@pytest.mark.parametrize("name,extra", [("ConvNeXt", {}), ("Swin v1", {}), ("Swin v2", {}), ("EVA-02", {}),
                                        ("ViT", dict(global_pool="avg")), ("ResNet", {})])
def test_average_pool_cams_average_back_to_the_logits(name, extra):
    """With a LayerNorm after the pool (ConvNeXt, ViT/EVA fc_norm) each position is normalised with
    the pooled vector's statistics, so the CAM still averages to the logits exactly."""
    net, x = tiny(name, **extra)
    head = fmaps.head_relation(net)
    with torch.no_grad():
        cams = fmaps.class_activation_maps(fmaps.spatial_features(net, x), head)
        logits = net(x)
    assert head.pool == fmaps.AVG
    assert cams.shape[:2] == (2, K)
    torch.testing.assert_close(cams.mean((2, 3)), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ViT", "DeiT distilled", "ViT registers"])
def test_class_token_cams_are_the_head_on_every_patch_token_and_class_specific(name):
    net, x = tiny(name)
    head = fmaps.head_relation(net)
    with torch.no_grad():
        feats = fmaps.spatial_features(net, x)
        cams = fmaps.class_activation_maps(feats, head)
        patches = feats.native[:, net.num_prefix_tokens:]  # (B, N, C)
        if name == "DeiT distilled":  # both heads, averaged as timm averages their logits
            expected = (net.head(patches) + net.head_dist(patches)) / 2
        else:
            expected = net.head(patches)
    h, w = cams.shape[-2:]
    assert head.pool == fmaps.TOKEN
    torch.testing.assert_close(cams.flatten(2).transpose(1, 2), expected.view(2, h * w, K))
    assert not torch.allclose(cams[:, 0], cams[:, 1])  # each class has its own map


def test_a_head_with_a_hidden_layer_stops_with_one_sentence():
    net, _ = tiny("MobileNetV3")  # conv_head + activation after the pool
    with pytest.raises(UserError, match="use gradcam"):
        fmaps.head_relation(net)


def test_a_backbone_outside_the_families_works_or_stops_with_one_sentence():
    mamba = timm.create_model("test_mambaout", pretrained=False, num_classes=K).eval()  # NHWC like Swin
    with torch.no_grad():
        feats = fmaps.spatial_features(mamba, torch.randn(1, 3, 160, 160))
    assert feats.map.shape[:2] == (1, mamba.num_features)
    mixer = timm.create_model("mixer_s16_224", pretrained=False, num_classes=K, img_size=64).eval()  # tokens, no grid
    feats = fmaps.spatial_features(mixer, torch.randn(1, 3, 64, 64))
    assert feats.native.shape == (1, 16, mixer.num_features)  # its own head still reads the tokens
    with pytest.raises(UserError, match="not a spatial map"):
        feats.map


@pytest.mark.parametrize("name", ["ResNet", "ViT", "Swin v1"])
def test_intermediate_maps_are_nchw_with_the_last_features(name):
    net, x = tiny(name)
    with torch.no_grad():
        last, maps = fmaps.intermediate_maps(net, x, [0, -1])
        ref = fmaps.spatial_features(net, x)
    assert all(m.ndim == 4 for m in maps)
    assert maps[-1].shape[1] == net.num_features
    torch.testing.assert_close(last.map, ref.map)


@pytest.mark.parametrize("name", ["ResNet", "ViT", "Swin v1"])
def test_the_hook_module_outputs_the_native_features(name):
    net, x = tiny(name)
    module = fmaps.output_module(net, x[:1])
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        native = net.forward_features(x)
    handle.remove()
    assert torch.equal(seen[-1], native)


@pytest.mark.parametrize("name", ["Swin v1", "ViT", "ResNet"])
def test_features_only_levels_are_nchw_for_every_family(name):
    """timm gives Swin's features_only levels as NHWC; the owner turns them into (B, C, h, w)."""
    family = FAMILIES[name]
    net = timm.create_model(family.backbone, pretrained=False, features_only=True, out_indices=(1,), **family.args)
    x = torch.randn(1, 3, family.side, family.side)
    with torch.no_grad():
        level = fmaps.features_only_map(net, x)
    assert level.ndim == 4 and level.shape[1] == net.feature_info.channels()[-1]
