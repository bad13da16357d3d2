"""Attention faithful to its papers (issue 16): each option against its reference formula, the
recipe keys reaching the blocks, and every method's default stages building and training on the
resnet, convnext and efficientnet families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fgvc.config import load_recipe
from fgvc.errors import UserError
from fgvc.models.attention import CBAM, AttentionGate, GatedStage, ResidualAttention, SoftMask
from fgvc.models.attention.options import BlockOptions
from fgvc.models.attention.patch import backbone_stages, default_stages
from fgvc.models.attention.residual import PreActUnit
from fgvc.models.build import build_model
from fgvc.models.classifier import Classifier

SIDE = 32  # image side: small and fast, every stage still at least 1x1


def capture(module: nn.Module) -> dict:
    """Forward hook that keeps the module's input and (final, hooked) output."""
    seen: dict = {}

    def hook(m: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen["x"], seen["out"] = args[0].detach().clone(), output.detach().clone()  # before in-place changes

    module.register_forward_hook(hook)
    return seen


# ---- residual attention: H(x) = (1 + M(x)) * T(x) (Wang et al. 2017, eq. 3) ----

@pytest.mark.parametrize("form", ["paper", "output_mask"])
def test_residual_stage_is_one_plus_mask_of_input_times_trunk(form):
    """After a stage: x the stage's input, T(x) the plain stage; the mask reads x (the paper) or T."""
    torch.manual_seed(0)
    model = Classifier("test_resnet", 5, attention="residual", attention_stages=[2], image_size=SIDE,
                       attention_options=BlockOptions(residual_form=form)).eval()
    stage, block = model.net.layer2, model.attention["stage2"]
    seen = capture(stage)  # registered after the attention hook: sees H
    with torch.no_grad():
        model(torch.randn(2, 3, SIDE, SIDE))
        x = seen["x"]                                      # (B, C_in, H_in, W_in) = layer1's output
        t = stage.forward(x)                               # T(x): the stage without its hooks
        m = block.mask(x, t.shape[-2:]) if form == "paper" else block.mask(t)
        assert m.shape == t.shape and x.shape[1:] != t.shape[1:]
        assert torch.allclose(seen["out"], (1 + m) * t, atol=1e-6)
    first_bn = block.mask.down[0].branch[0] if block.mask.depth else block.mask.head[0]
    assert first_bn.num_features == (x if form == "paper" else t).shape[1]  # which map the mask reads


def test_residual_in_blocks_masks_the_residual_branch_with_the_block_input():
    """Block placement: T the residual branch (what reaches the slot), x the residual block's input."""
    torch.manual_seed(0)
    model = Classifier("test_resnet", 5, attention="residual", attention_stages=[3], attention_placement="block",
                       image_size=SIDE, backbone_args={"zero_init_last": False}).eval()  # T not all zeros
    first = model.net.layer3[0]
    block_in = capture(first)
    slot = capture(first.se)
    with torch.no_grad():
        model(torch.randn(2, 3, SIDE, SIDE))
        x, t = block_in["x"], slot["x"]
        assert x.shape[1:] != t.shape[1:]  # the stage's first block changes width and grid
        assert torch.allclose(slot["out"], (1 + first.se.mask(x, t.shape[-2:])) * t, atol=1e-6)
    assert first.se._input is None  # the handed-over input is not kept after use


def unit_sides(mask: SoftMask, x: torch.Tensor) -> list[int]:
    sides: list[int] = []
    handles = [m.register_forward_hook(lambda m, a, o: sides.append(o.shape[-1]))
               for m in mask.modules() if isinstance(m, PreActUnit)]
    mask(x)
    for h in handles:
        h.remove()
    return sides


def residual_mask(form: str, channels: int, side: int) -> SoftMask:
    return ResidualAttention(channels, side, form=form).mask


@pytest.mark.parametrize("form,units", [("paper", 2), ("output_mask", 1)])
@pytest.mark.parametrize("side,depth", [(14, 1), (28, 2), (56, 3)])
def test_residual_mask_units_at_the_lowest_resolution(form, units, side, depth):
    """The paper: two units at the lowest resolution; fgvc's earlier form one (its state dict unchanged)."""
    mask = residual_mask(form, 8, side).eval()
    with torch.no_grad():
        sides = unit_sides(mask, torch.randn(1, 8, side, side))
    lowest = min(sides)
    assert mask.depth == depth and sides.count(lowest) == units and lowest == -(-side // 2 ** depth)
    assert any(k.startswith("lowest.") for k in mask.state_dict()) == (form == "paper")


@pytest.mark.parametrize("form,align_corners", [("paper", True), ("output_mask", False)])
def test_residual_mask_upsampling(form, align_corners):
    """With identity residual units (last conv zero), a one-pool mask is
    sigmoid(head(upsample(maxpool3x3/2(x)))), corner to corner in the paper's form (the reference's
    Caffe Interp layer)."""
    torch.manual_seed(0)
    c, side = 6, 14
    mask = residual_mask(form, c, side).eval()
    for unit in mask.modules():
        if isinstance(unit, PreActUnit):
            nn.init.zeros_(unit.branch[-1].weight)
    x = torch.randn(2, c, side, side)
    pooled = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)                  # (B, C, 7, 7)
    with torch.no_grad():
        corner = mask.head(F.interpolate(pooled, size=(side, side), mode="bilinear", align_corners=True)).sigmoid()
        half_pixel = mask.head(F.interpolate(pooled, size=(side, side), mode="bilinear", align_corners=False)).sigmoid()
        ours = mask(x)
    expected, other = (corner, half_pixel) if align_corners else (half_pixel, corner)
    assert torch.allclose(ours, expected, atol=1e-6) and not torch.allclose(ours, other, atol=1e-4)


def test_residual_identity_init_and_bad_mask_source():
    block = ResidualAttention(4, 8, identity_init=True, in_channels=6)
    t, x = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 16, 16)
    assert torch.equal(block(t, x), t)
    with pytest.raises(ValueError, match="form"):
        ResidualAttention(4, 8, form="trunk")


# ---- attention gates (Oktay et al. 2018; AG-Sononet, Schlemper et al. 2019) ----

def compatibility(gate: AttentionGate, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """q = psi^T relu(W_x^T x + W_g^T g + b_g) + b_psi, g resampled to x's grid (Oktay eq. 1)."""
    wg = F.conv2d(g, gate.phi.weight, gate.phi.bias)
    wg = F.interpolate(wg, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return F.conv2d(F.relu(F.conv2d(x, gate.theta.weight) + wg), gate.psi.weight, gate.psi.bias)  # (B, 1, H, W)


def test_gate_sigmoid_default_is_sigmoid_and_mean_pooled():
    torch.manual_seed(0)
    stage = GatedStage(8, 16, num_classes=3)
    x, g = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)
    alpha = compatibility(stage.gate, x, g).sigmoid()
    with torch.no_grad():
        assert torch.allclose(stage.gate(x, g), alpha, atol=1e-6)
        assert torch.allclose(stage(x, g), stage.fc((alpha * x).mean((2, 3))), atol=1e-6)


def test_gate_sum_one_is_ag_sononet_normalisation_and_sum_pooling():
    """alpha_i = (q_i - min q) / sum_j (q_j - min q); x_hat = sum_i alpha_i x_i."""
    torch.manual_seed(0)
    stage = GatedStage(8, 16, num_classes=3, norm="sum_one")
    x, g = torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)
    q = compatibility(stage.gate, x, g)
    shifted = q - q.amin((2, 3), keepdim=True)
    alpha = shifted / shifted.sum((2, 3), keepdim=True)
    with torch.no_grad():
        ours = stage.gate(x, g)
        assert torch.allclose(ours, alpha, atol=1e-6)
        assert torch.allclose(ours.sum((2, 3)), torch.ones(2, 1), atol=1e-6)
        assert torch.allclose(stage(x, g), stage.fc((alpha * x).sum((2, 3))), atol=1e-5)
        one = stage.gate(torch.randn(2, 8, 1, 1), g)  # a 1x1 map: all the weight on its one position
    assert torch.allclose(one, torch.ones_like(one))


def test_gate_inner_width_is_the_gating_stages_or_half():
    assert AttentionGate(32, 96).theta.out_channels == 96  # AG-Sononet: inter_channels = the gating filters
    assert AttentionGate(32, 96, width="half").phi.out_channels == 16
    with pytest.raises(ValueError):
        AttentionGate(32, 96, norm="softmax")


def test_gate_listing_the_deepest_stage_gates_the_others():
    cfg = load_recipe(["recipe=synth_cbam", "model.attention.type=gate", "model.attention.placement=stage",
                       f"data.image_size={SIDE}"])
    assert list(cfg.model.attention.stages) == [1, 2, 3, 4]
    model = build_model(cfg.model, 5, SIDE)
    assert model.gate_stages == [1, 2, 3]
    assert model(torch.randn(2, 3, SIDE, SIDE)).shape == (2, 5)


# ---- CBAM: the authors' batch norm after the 7x7 conv ----

def test_cbam_spatial_bn_momentum_and_zero_init():
    torch.manual_seed(0)
    cbam = CBAM(16, spatial_bn_momentum=0.01, spatial_bn_zero_init=True).train()
    x = torch.randn(2, 16, 5, 5)
    spatial = cbam.spatial(x)  # weight 0, bias 0: M_s = sigmoid(0) = 1/2 everywhere at the start
    assert torch.equal(spatial, torch.full_like(spatial, 0.5))
    bn = cbam.spatial.bn
    bn.reset_running_stats()
    conv = cbam.spatial.conv(torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1))  # (B, 1, H, W)
    cbam.spatial(x)
    assert torch.allclose(bn.running_mean, 0.01 * conv.mean().detach().view(1), atol=1e-7)
    default = CBAM(16).spatial.bn
    assert default.momentum == 0.1 and torch.equal(default.weight, torch.ones(1))


# ---- recipe keys reach the blocks through the one builder ----

def test_recipe_keys_reach_the_blocks():
    cfg = load_recipe(["recipe=synth_cbam", "model.attention.mlp_bias=false", "model.attention.spatial_order=mean_max",
                       "model.attention.spatial_bn_momentum=0.01", "model.attention.spatial_bn_zero_init=true"])
    blocks = [m for m in build_model(cfg.model, 4, cfg.data.image_size).modules() if isinstance(m, CBAM)]
    assert blocks and all(b.channel.fc1.bias is None and not b.spatial.max_first for b in blocks)
    assert all(b.spatial.bn.momentum == 0.01 and not b.spatial.bn.weight.any() for b in blocks)
    cfg = load_recipe(["recipe=synth_cbam", "model.attention.spatial_norm=false"])
    blocks = [m for m in build_model(cfg.model, 4, cfg.data.image_size).modules() if isinstance(m, CBAM)]
    assert blocks and all(isinstance(b.spatial.bn, nn.Identity) for b in blocks)

    cfg = load_recipe(["recipe=synth_gate", "model.attention.gate_norm=sum_one", "model.attention.gate_width=half"])
    gates = [m for m in build_model(cfg.model, 4, cfg.data.image_size).modules() if isinstance(m, AttentionGate)]
    assert gates and all(g.norm == "sum_one" and g.theta.out_channels == g.theta.in_channels // 2 for g in gates)

    cfg = load_recipe(["recipe=synth_residual", "model.attention.residual_form=output_mask"])
    blocks = [m for m in build_model(cfg.model, 4, cfg.data.image_size).modules() if isinstance(m, ResidualAttention)]
    assert blocks and all(b.form == "output_mask" and not b.reads_input for b in blocks)


@pytest.mark.parametrize("override,phrase", [("model.attention.spatial_bn_momentum=0", "spatial_bn_momentum"),
                                             ("model.attention.gate_norm=softmax", "must be one of"),
                                             ("model.attention.residual_form=trunk", "must be one of")])
def test_bad_attention_options_are_one_sentence(override, phrase):
    with pytest.raises(UserError, match=phrase):
        load_recipe(["recipe=synth_cbam", override])


def test_runs_saved_before_the_new_keys_rebuild_as_they_were_trained(tmp_path):
    """A saved recipe.yaml lacking residual_form / gate_width predates them: it gets the old values."""
    from omegaconf import OmegaConf

    from fgvc.config import to_yaml

    saved = OmegaConf.create(to_yaml(load_recipe(["recipe=synth_residual"])))
    old = tmp_path / "old.yaml"
    del saved.model.attention["residual_form"], saved.model.attention["gate_width"]
    old.write_text(OmegaConf.to_yaml(saved))
    cfg = load_recipe(recipe_file=old)
    assert cfg.model.attention.residual_form == "output_mask" and cfg.model.attention.gate_width == "half"
    new = tmp_path / "new.yaml"
    new.write_text(to_yaml(load_recipe(["recipe=synth_gate"])))
    cfg = load_recipe(recipe_file=new)
    assert cfg.model.attention.residual_form == "paper" and cfg.model.attention.gate_width == "gating"


# ---- defaults that work: each method picks its own stages ----

# backbone -> method -> the default stages (feature_info indices): from stride 4 on; residual without
# the deepest; gates the two before the deepest
DEFAULT_STAGES = {
    "test_resnet": {"se": [1, 2, 3, 4], "cbam": [1, 2, 3, 4], "residual": [1, 2, 3], "gate": [2, 3]},
    "test_convnext": {"se": [0, 1, 2, 3], "cbam": [0, 1, 2, 3], "residual": [0, 1, 2], "gate": [1, 2]},
    "test_efficientnet": {"se": [1, 2, 3, 4], "cbam": [1, 2, 3, 4], "residual": [1, 2, 3], "gate": [2, 3]},
}


@pytest.mark.parametrize("backbone", list(DEFAULT_STAGES))
def test_default_stages_per_method_and_backbone(backbone):
    import timm

    stages = backbone_stages(timm.create_model(backbone), backbone)
    for method, expected in DEFAULT_STAGES[backbone].items():
        assert [s.index for s in default_stages(method, stages)] == expected, method


@pytest.mark.parametrize("backbone", list(DEFAULT_STAGES))
@pytest.mark.parametrize("method", ["se", "cbam", "residual", "gate", "stn"])
def test_naming_only_the_method_builds_and_trains_one_step(backbone, method):
    cfg = load_recipe([f"model.backbone={backbone}", "model.weights=", f"model.attention.type={method}",
                       f"data.image_size={SIDE}"])
    assert list(cfg.model.attention.stages) == []
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=4, image_size=SIDE).train()
    if method == "gate":
        assert model.gate_stages == DEFAULT_STAGES[backbone]["gate"]
    elif method != "stn":
        assert sorted(model.attention) == [f"stage{i}" for i in DEFAULT_STAGES[backbone][method]]
    new = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("net.")}
    assert new
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.randn(4, 3, SIDE, SIDE)), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in new.items())
