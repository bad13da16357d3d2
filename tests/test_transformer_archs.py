"""RA-CNN (both proposals) and the DCN with vision-transformer backbones: ViT, DeiT (distilled),
EVA-02 and Swin, tiny (`pretrained=false`, one or two blocks), one training step each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fgvc.config import load_recipe
from fgvc.engine.losses import DcnLoss, ZoomLoss, build_schedule
from fgvc.errors import UserError
from fgvc.models.dcn import DCN, NEVER_EXIT, DcnStep
from fgvc.models.token_attention import attention_modules
from fgvc.models.zoom import APN, CLS, PRETRAIN, RACNN, ROLLOUT_THRESHOLD, largest_region, rollout_box

TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
# (backbone, timm arguments that make it tiny, input side): side = 1.5 x 4 patches or more, at sizes its weights are not for
FAMILIES = {
    "vit": ("test_vit", {}, 64),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=1), 64),
    "eva02": ("eva02_tiny_patch14_224", dict(depth=1), 56),
    "swin": ("swin_tiny_patch4_window7_224", TINY_SWIN, 64),
}
TOKEN_FAMILIES = ("vit", "deit_distilled", "eva02")


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(prefix))


def _step(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return before


# --- RAMS-Trans's box -------------------------------------------------------------------------


def test_largest_region_is_scipys_largest_8_connected_component():
    gen = torch.Generator().manual_seed(0)
    for density in (0.2, 0.35, 0.5):
        masks = torch.rand(8, 9, 11, generator=gen) < density
        found = largest_region(masks)
        for mask, region in zip(masks.numpy(), found.numpy()):
            labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
            areas = np.bincount(labels.ravel())[1:]
            expected = labels == (1 + int(np.argmax(areas))) if count else np.zeros_like(mask)
            np.testing.assert_array_equal(region, expected)


def test_rollout_box_is_the_box_of_the_largest_region_above_1_2_times_the_mean():
    scores = torch.ones(2, 8, 8)
    scores[0, 2:5, 1:7] = 10  # the region: rows 2-4, columns 1-6
    scores[0, 7, 7] = 10  # a smaller region elsewhere
    box = rollout_box(scores, ROLLOUT_THRESHOLD)
    # x from 1/8 to 7/8, y from 2/8 to 5/8: centre (0.5, 0.4375), half width 0.375, half height 0.1875
    torch.testing.assert_close(box[0], torch.tensor([0.5, 0.4375, 0.375, 0.1875]))
    torch.testing.assert_close(box[1], torch.tensor([0.5, 0.5, 0.5, 0.5]))  # nothing above: the whole image


# --- RA-CNN -------------------------------------------------------------------------------------


@pytest.mark.parametrize("proposal", ["apn", "rollout"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_racnn_trains_a_step_on_every_transformer_family(family, proposal):
    name, args, side = FAMILIES[family]
    if proposal == "rollout" and family not in TOKEN_FAMILIES:
        with pytest.raises(UserError, match="model.zoom.proposal=apn"):
            RACNN(name, 3, image_size=side, scales=2, proposal=proposal, backbone_args=args)
        return
    torch.manual_seed(0)
    model = RACNN(name, 3, image_size=side, scales=2, proposal=proposal, backbone_args=args).train()
    fused = [m.fused_attn for m in attention_modules(model)]
    x, y = torch.randn(2, 3, side, side), torch.tensor([0, 2])
    phase = PRETRAIN if proposal == "apn" else CLS
    out = model(x, phase=phase)
    terms = ZoomLoss()(out, y)
    assert torch.isfinite(terms["loss"])
    before = _step(model, terms["loss"])
    assert _changed(model, before, "backbones.0") and _changed(model, before, "backbones.1")
    assert [m.fused_attn for m in attention_modules(model)] == fused  # the rollout's unfused pass is undone
    width = 3 if proposal == "apn" else 4  # APN squares, RAMS-Trans's rectangles
    box = out.boxes[0]
    assert box.shape == (2, width) and bool((box[:, :2] > 0).all() and (box[:, :2] < side).all())
    if proposal == "apn":  # the APN's own update: ranking loss through the token map
        terms = ZoomLoss()(model(x, phase=APN), y)
        before = _step(model, terms["loss"])
        assert _changed(model, before, "apns") and not _changed(model, before, "backbones")


def test_the_rollout_box_is_cut_from_the_full_resolution_image(monkeypatch):
    """RAMS-Trans's box of the first scale's rollout, in pixels of the delivered 96-px image (twice
    the 48-px input), and the second scale reads that rectangle stretched to the input size."""
    model = RACNN("test_vit", 3, image_size=48, scales=2, proposal="rollout").eval()
    hot = torch.ones(1, 3, 3)
    hot[0, 0, 1:3] = 5  # top row, right two cells
    monkeypatch.setattr(model, "rollout_scores", lambda s, image: hot)
    x = torch.rand(1, 3, 96, 96)
    seen, real = [], model._scale
    monkeypatch.setattr(model, "_scale", lambda s, image, frozen: (seen.append(image), real(s, image, frozen))[1])
    out = model(x)
    torch.testing.assert_close(out.boxes[0], torch.tensor([[64.0, 16.0, 32.0, 16.0]]))  # x 32..96, y 0..32
    expected = torch.nn.functional.interpolate(x[:, :, 0:32, 32:96], size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[1][:, :, 2:-2, 2:-2], expected[:, :, 2:-2, 2:-2], atol=0.02, rtol=0)


def test_rollout_rectangles_are_drawn_and_scored_as_rectangles():
    from fgvc.analysis.maps import box_window

    square, rectangle = box_window(torch.tensor([[8.0, 8.0, 4.0], [8.0, 8.0, 6.0]]), 16, 16), \
        box_window(torch.tensor([[8.0, 8.0, 4.0, 4.0], [8.0, 8.0, 6.0, 2.0]]), 16, 16)
    torch.testing.assert_close(square[0], rectangle[0])
    inside = rectangle[1] > 0
    assert int(inside.any(0).sum()) == 12 and int(inside.any(1).sum()) == 4  # 12 px wide, 4 px high

def test_a_rollout_recipe_trains_classification_updates_only():
    cfg = load_recipe(["recipe=synth_racnn", "model.backbone=test_vit", "model.weights=", "model.zoom.proposal=rollout"])
    schedule = build_schedule(cfg, updates_per_epoch=5)
    assert {schedule.phase(u) for u in range(40)} == {CLS}
    with pytest.raises(UserError, match="proposal"):
        load_recipe(["recipe=synth_racnn", "model.zoom.proposal=attention"])


# --- DCN ---------------------------------------------------------------------------------------

# the DCN's remaining design arguments (it names every one): the whole coarse network, no early exit, random weights
PLAIN_DCN = dict(coarse_stages=0, exit_threshold=NEVER_EXIT, whole_image=False, pretrained=False, pool="avg",
                 coarse_weights="", fine_weights="")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dcn_trains_a_step_with_transformer_coarse_and_fine_networks(family):
    """Both networks of the family; the fine one on 32-px patches, smaller than its weights' size."""
    name, args, side = FAMILIES[family]
    patch = 28 if family == "eva02" else 32  # whole patches (EVA's are 14 px)
    torch.manual_seed(0)
    model = DCN(3, image_size=2 * side, coarse_backbone=name, fine_backbone=name, coarse_image_size=side,
                patch_size=patch, top_k=2, saliency="cam", top_layers="fuse", top_hidden=False, detach_fusion=True,
                backbone_args=args, **PLAIN_DCN).train()
    out = model(torch.randn(2, 3, 2 * side, 2 * side), phase=DcnStep("joint", 2, 1))
    assert out.boxes.shape == (2, 2, 4) and out.fine_logits.shape == (2, 3)
    terms = DcnLoss(hint_weight=0.0, coarse_weight=1.0, fine_weight=1.0)(out, torch.tensor([0, 1]))
    before = _step(model, terms["loss"])
    assert _changed(model, before, "coarse.net") and _changed(model, before, "fine.net")


def test_dcn_mixes_families_and_the_vit_patch_vector_is_its_class_token():
    model = DCN(3, image_size=128, coarse_backbone="test_resnet", fine_backbone="test_vit", coarse_image_size=64,
                patch_size=32, top_k=2, saliency="cam", top_layers="fuse", top_hidden=False, detach_fusion=True,
                **PLAIN_DCN).eval()
    patches = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.fine.net.forward_features(patches)  # (2, 1 + 2*2, C), normalised
        torch.testing.assert_close(model.fine.vector(patches), tokens[:, 0])
        assert model(torch.randn(2, 3, 128, 128)).logits.shape == (2, 3)


def test_dcn_on_a_backbone_whose_head_has_its_own_hidden_layer_reads_the_map_mean():
    """MambaOut's head widens 64 -> 256 channels before its classifier: its pre-logits are not the
    map's width, so the patch vector is the map's mean (the traceback of the backbone matrix before)."""
    model = DCN(3, image_size=128, coarse_backbone="test_mambaout", fine_backbone="test_mambaout",
                coarse_image_size=64, patch_size=64, top_k=1, saliency="cam", top_layers="fuse", top_hidden=False,
                detach_fusion=True, **PLAIN_DCN).eval()
    patches = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model.fine.net.head_hidden_size != model.fine.net.num_features
        torch.testing.assert_close(model.fine.vector(patches), model.fine(patches).mean((2, 3)))
        assert model(torch.randn(2, 3, 128, 128)).logits.shape == (2, 3)


# --- attention blocks on the stage maps of Swin, MaxViT and CoAtNet ----------------------------


def test_identity_blocks_after_swins_nhwc_stages_leave_its_logits_unchanged():
    """Swin's stages give (B, H, W, C); each block reads (B, C, H, W) and its output goes back, so
    blocks that start as the identity compute exactly the plain Swin's logits."""
    from fgvc.models.classifier import Classifier

    torch.manual_seed(0)
    plain = Classifier(FAMILIES["swin"][0], 3, image_size=96, backbone_args=TINY_SWIN).eval()
    seen = []
    for kind in ("se", "cbam", "residual"):
        model = Classifier(FAMILIES["swin"][0], 3, attention=kind, attention_init="identity", image_size=96,
                           backbone_args=TINY_SWIN).eval()
        model.net.load_state_dict(plain.net.state_dict())
        handles = [b.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape))) for b in model.attention.values()]
        x = torch.randn(2, 3, 96, 96)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x))
        for h in handles:
            h.remove()
    assert seen[:4] == [(2, 16, 24, 24), (2, 32, 12, 12), (2, 64, 6, 6), (2, 128, 3, 3)]  # (B, C, H, W) per stage


@pytest.mark.parametrize("name, side, args", [("swin_tiny_patch4_window7_224", 96, TINY_SWIN), ("test_maxvit", 96, {}),
                                              ("test_coatnet", 160, {})])
def test_attention_after_the_stages_of_hierarchical_transformers_trains(name, side, args):
    from fgvc.models.classifier import Classifier

    model = Classifier(name, 3, attention="cbam", image_size=side, backbone_args=args).train()
    before = _step(model, torch.nn.functional.cross_entropy(model(torch.randn(2, 3, side, side)), torch.tensor([0, 1])))
    assert _changed(model, before, "attention.stage") and len(model.attention) >= 3


def test_attention_inside_vit_and_swin_blocks_is_one_sentence():
    from fgvc.models.classifier import Classifier

    with pytest.raises(UserError, match=r"plain vision transformer.*model.attention.type=none.*Swin, MaxViT, CoAtNet"):
        Classifier("test_vit", 3, attention="se", image_size=64)
    with pytest.raises(UserError, match="model.attention.placement=stage"):
        Classifier(FAMILIES["swin"][0], 3, attention="se", attention_placement="block", image_size=64,
                   backbone_args=TINY_SWIN)


def test_rollout_on_a_backbone_without_tokens_stops_before_anything_runs():
    with pytest.raises(UserError, match="'test_resnet' has no token sequence; use model.zoom.proposal=apn"):
        load_recipe(["recipe=synth_racnn", "model.zoom.proposal=rollout"])


def test_flops_of_a_vit_count_its_attention_products():
    """torch's counter has no formula for fused CPU attention: fgvc counts a ViT as the same ViT with
    timm's explicit attention (Q K^T and A V as matrix products), also through a lambda."""
    import timm

    from fgvc.analysis.cost import count_flops

    net = timm.create_model("test_vit", num_classes=3).eval()
    x = torch.zeros(1, 3, 160, 160)
    counted = count_flops(lambda images: net(images), x)
    for m in attention_modules(net):
        m.fused_attn = False
    explicit = count_flops(net, x)
    n, d = 1 + 10 * 10, net.embed_dim
    assert counted == explicit > 2 * 2 * n * n * d * len(net.blocks)
