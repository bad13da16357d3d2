"""Maps of vision transformers (fgvc/models/token_attention.py, fgvc/analysis/maps.py): attention
rollout as Abnar and Zuidema define it, class-token attention, fused attention back on after every
extraction (also after an exception), and the maps drawn for every family like the CNN maps."""

from __future__ import annotations

import pytest
import timm
import torch

from fgvc.analysis.backbones import FAMILIES
from fgvc.analysis.maps import compute_maps, sources_for
from fgvc.errors import UserError
from fgvc.models import features as fmaps
from fgvc.models.classifier import Classifier
from fgvc.models.token_attention import attention_maps, attention_modules, rollout, unfused_attention

K = 3


def tiny_net(name: str):
    f = FAMILIES[name]
    torch.manual_seed(0)
    return timm.create_model(f.backbone, pretrained=False, num_classes=K, **f.args).eval(), torch.randn(2, 3, f.side, f.side)


def test_rollout_follows_the_paper_on_a_hand_made_example():
    """Two layers, two heads, three tokens: R = A'_2 A'_1 with A' = rows(0.5 * mean_heads(A) + 0.5 I)."""
    torch.manual_seed(0)
    layers = [torch.rand(1, 2, 3, 3).softmax(-1) for _ in range(2)]
    expected = torch.eye(3)
    for a in layers:
        fused = a[0].mean(0)
        step = 0.5 * fused + 0.5 * torch.eye(3)
        step = step / step.sum(-1, keepdim=True)
        expected = step @ expected
    torch.testing.assert_close(rollout(layers)[0], expected)
    assert torch.allclose(rollout(layers).sum(-1), torch.ones(1, 3))  # rows stay distributions
    # max / min head fusion and a discard ratio change the result; the class token's self-attention stays
    assert not torch.allclose(rollout(layers, "max"), rollout(layers, "min"))
    discarded = rollout(layers, discard_ratio=0.5)
    assert discarded.shape == (1, 3, 3) and not torch.allclose(discarded, rollout(layers))
    with pytest.raises(UserError, match="head fusion"):
        rollout(layers, "median")


@pytest.mark.parametrize("name", ["ViT", "DeiT distilled", "ViT registers", "EVA-02"])
def test_fused_attention_is_off_only_inside_and_gives_the_same_features(name):
    net, x = tiny_net(name)
    modules = attention_modules(net)
    assert len(modules) == 2 and all(m.fused_attn for m in modules)  # timm's default on this torch
    with torch.no_grad():
        fused = net.forward_features(x)
        with unfused_attention(net) as recorded:
            assert not any(m.fused_attn for m in modules)
            plain = net.forward_features(x)
    assert all(m.fused_attn for m in modules)
    n = net.num_prefix_tokens + fmaps.spatial_features(net, x).map[0, 0].numel()
    assert [tuple(a.shape) for a in recorded] == [(2, 2, n, n)] * 2
    torch.testing.assert_close(recorded[0].sum(-1), torch.ones(2, 2, n))
    torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)


def test_fused_attention_is_restored_after_an_exception_and_hooks_are_removed():
    net, x = tiny_net("ViT")
    modules = attention_modules(net)
    with pytest.raises(RuntimeError, match="boom"):
        with unfused_attention(net):
            raise RuntimeError("boom")
    assert all(m.fused_attn for m in modules)
    assert not any(m.attn_drop._forward_hooks for m in modules)
    modules[0].fused_attn = False  # a module that was unfused before stays unfused
    with unfused_attention(net):
        pass
    assert [m.fused_attn for m in modules] == [False, True]


@pytest.mark.parametrize("name", ["ViT", "DeiT distilled", "ViT registers", "EVA-02"])
def test_class_attention_is_the_last_layers_class_row_on_the_patch_grid(name):
    net, x = tiny_net(name)
    with torch.no_grad(), unfused_attention(net) as recorded:
        net.forward_features(x)
    maps = attention_maps(net, x)
    grid = fmaps.spatial_features(net, x).map.shape[-2:]
    p = net.num_prefix_tokens
    expected = recorded[-1].mean(1)[:, 0, p:].reshape(2, *grid)
    torch.testing.assert_close(maps["class_attention"], expected)
    assert maps["rollout"].shape == (2, *grid)


def test_cnn_and_swin_have_no_attention_maps_and_say_so():
    for name in ("ResNet", "Swin v1"):
        f = FAMILIES[name]
        model = Classifier(f.backbone, K, backbone_args=f.args).eval()
        assert "rollout" not in sources_for(model)
        with pytest.raises(UserError, match="needs a ViT-family backbone"):
            sources_for(model, ["rollout"])


@pytest.mark.parametrize("name", ["ViT", "DeiT distilled", "ViT registers", "EVA-02", "Swin v1", "Swin v2",
                                  "ConvNeXt", "ResNet"])
def test_every_family_gets_its_maps_at_input_resolution_and_fused_attention_comes_back(name):
    f = FAMILIES[name]
    torch.manual_seed(0)
    model = Classifier(f.backbone, K, backbone_args=f.args).eval()
    x = torch.randn(2, 3, f.side, f.side)
    before = [m.fused_attn for m in attention_modules(model.net)]  # timm's own choice per family
    out = compute_maps(model, x)
    wanted = {"cam", "gradcam"} | ({"rollout", "class_attention"} if f.vit else set())
    assert set(out.maps) == wanted
    for m in out.maps.values():
        assert m.shape == (2, f.side, f.side) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert [m.fused_attn for m in attention_modules(model.net)] == before
    # class-specific maps differ between classes (a class-agnostic map would not)
    other = compute_maps(model, x, ["cam"], classes=(out.logits.argmax(1) + 1) % K)
    assert not torch.allclose(other.maps["cam"], out.maps["cam"])


@pytest.mark.parametrize("name", ["ResNet", "RegNet", "ConvNeXt"])
def test_cnn_gradcam_through_the_owner_equals_gradcam_on_the_last_stage_as_before(name):
    """Before the owner, Grad-CAM read timm's last feature_info module; for these CNNs that module's
    output is forward_features' output, so the maps are identical."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from fgvc.analysis.maps import gradcam, normalise

    f = FAMILIES[name]
    torch.manual_seed(0)
    model = Classifier(f.backbone, K, backbone_args=f.args).eval()
    x = torch.randn(2, 3, 128, 128)
    classes = torch.tensor([0, 2])
    layer = model.net.get_submodule(model.net.feature_info[-1]["module"])
    with GradCAM(model=model, target_layers=[layer]) as explainer:
        before = normalise(torch.from_numpy(explainer(input_tensor=x, targets=[ClassifierOutputTarget(0),
                                                                                ClassifierOutputTarget(2)])).float())
    torch.testing.assert_close(gradcam(model, x, classes)["gradcam"], before, rtol=0, atol=0)
