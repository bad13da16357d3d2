"""Attention: blocks against their papers and timm, placement in every listed family,
identity starts, untouched pretrained weights, recipes, a few training steps, the recorder."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from fgvc.config import load_recipe
from fgvc.errors import UserError
from fgvc.models.attention.cbam import channel_max
from fgvc.models.attention import (CBAM, AttentionGate, AttentionRecorder, ResidualAttention, SoftMask,
                                   SpatialTransformer, SqueezeExcite, mask_depth)
from fgvc.models.build import build_model
from fgvc.models.classifier import Classifier

SIDE = 32  # image side of the family tests: every listed family still has a 1x1 last stage
# family -> (timm name, extra create_model args): tiny versions of every family the issue lists
FAMILIES = {
    "resnet": ("test_resnet", {}),
    # grouped bottlenecks, one per stage; timm's zero-initialised last BN would keep ECA's few weights
    # without gradient for the first steps of the training test
    "resnext": ("resnext50_32x4d", {"layers": (1, 1, 1, 1), "zero_init_last": False}),
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "regnet": ("regnetx_002", {}),
}
BLOCK_FAMILIES = ("resnet", "resnext", "efficientnet", "regnet")  # those with an attention slot in blocks
METHODS = ("se", "cbam", "residual", "gate", "stn", "eca")


def stages_for(method: str) -> list[int]:
    return [-3, -2] if method == "gate" else [-2, -1]


def make(family: str, method: str = "none", placement: str = "stage", init: str = "default",
         num_classes: int = 5, stages: list[int] | None = None, **kwargs) -> Classifier:
    name, args = FAMILIES[family]
    return Classifier(name, num_classes, attention=method, attention_stages=stages or stages_for(method),
                      attention_placement=placement, attention_init=init, image_size=SIDE,
                      backbone_args=args, **kwargs)


def combos(with_blocks: bool = True):
    for family in FAMILIES:
        for method in METHODS:
            yield family, method, "stage"
            if with_blocks and family in BLOCK_FAMILIES and method not in ("gate", "stn"):
                yield family, method, "block"


def new_names(model: torch.nn.Module, plain: torch.nn.Module) -> set[str]:
    return set(model.state_dict()) - set(plain.state_dict())


# ---- blocks: shapes, gate ranges, parameter counts against the papers' formulas ----

def test_se_shape_range_and_paper_parameter_count():
    c, r = 64, 16
    se = SqueezeExcite(c, r)
    x = torch.randn(2, c, 5, 7)
    s = se.excite(x.mean((2, 3)))
    assert se(x).shape == x.shape and s.shape == (2, c)
    assert bool(((s > 0) & (s < 1)).all())
    assert sum(p.numel() for p in se.parameters()) == 2 * c * c // r + c // r + c  # W1, W2 and their biases


def test_cbam_shapes_ranges_and_parameter_count():
    c, r, k = 64, 16, 7
    cbam = CBAM(c, r, k)
    x = torch.randn(2, c, 6, 6)
    ch, sp = cbam.channel(x), cbam.spatial(x)
    assert cbam(x).shape == x.shape and ch.shape == (2, c) and sp.shape == (2, 1, 6, 6)
    assert bool(((ch > 0) & (ch < 1)).all()) and bool(((sp > 0) & (sp < 1)).all())
    mlp = 2 * c * c // r + c // r + c  # shared MLP with biases (the authors' code)
    assert sum(p.numel() for p in cbam.parameters()) == mlp + 2 * k * k + 2  # + 7x7 conv on 2 maps + BN
    bare = CBAM(c, r, k, mlp_bias=False, spatial_norm=False)
    assert sum(p.numel() for p in bare.parameters()) == 2 * c * c // r + 2 * k * k  # eq. 2-3 as written


def test_residual_attention_mask_depth_shapes_and_counts():
    assert [mask_depth(s) for s in (56, 28, 14, 7, 2)] == [3, 2, 1, 0, 0]  # the paper's three modules
    c = 16
    block = ResidualAttention(c, feature_side=28)
    x, t = torch.randn(2, c, 28, 28), torch.randn(2, c, 28, 28)
    m = block.mask(x)
    assert block(t, x).shape == x.shape and m.shape == x.shape and bool(((m > 0) & (m < 1)).all())
    assert torch.allclose(block(t, x), (1 + m) * t)  # eq. 3
    flat = SoftMask(c, depth=0)  # only the two BN-ReLU-1x1 convolutions
    assert sum(p.numel() for p in flat.parameters()) == 2 * c * c + 2 * 2 * c


@pytest.mark.parametrize("width,inter", [("gating", 64), ("half", 16)])
def test_attention_gate_coefficients_and_parameter_count(width, inter):
    cx, cg = 32, 64
    gate = AttentionGate(cx, cg, width=width)
    alpha = gate(torch.randn(2, cx, 8, 8), torch.randn(2, cg, 2, 2))
    assert alpha.shape == (2, 1, 8, 8) and bool(((alpha > 0) & (alpha < 1)).all())
    assert sum(p.numel() for p in gate.parameters()) == cx * inter + (cg * inter + inter) + (inter + 1)


def test_spatial_transformer_starts_at_identity_transform():
    stn = SpatialTransformer(24)
    x = torch.randn(2, 3, 24, 24)
    theta = stn.localization(x)
    assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 1, 2, 3))
    assert torch.allclose(stn(x)[:, 0], x, atol=1e-5)  # identity grid, up to float rounding
    assert torch.equal(SpatialTransformer(24, identity_init=True)(x)[:, 0], x)  # exact with the identity start


# ---- fgvc blocks against timm's with copied weights ----

@pytest.mark.parametrize("train", [False, True])
def test_se_matches_timm_semodule(train):
    torch.manual_seed(0)
    c = 72
    theirs = timm.layers.SEModule(c).train(train)
    ours = SqueezeExcite(c, divisor=8).train(train)  # timm rounds C/r to a multiple of 8
    ours.load_timm(theirs)
    x = torch.randn(3, c, 5, 5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_cbam_matches_timm_cbammodule(train):
    torch.manual_seed(0)
    c = 64
    theirs = timm.layers.cbam.CbamModule(c)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        bn = theirs.spatial.conv.bn
        bn.running_mean.fill_(0.3), bn.running_var.fill_(2.0), bn.weight.fill_(1.5), bn.bias.fill_(-0.2)
    theirs.train(train)
    ours = CBAM(c, mlp_bias=False, spatial_order="mean_max").train(train)  # timm's two differences
    ours.load_timm(theirs)
    x = torch.randn(3, c, 9, 9)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    with torch.no_grad():  # the in-place inference path gives the same numbers
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 5, 40, 64])
def test_channel_max_by_halving_equals_amax_values_and_gradients(channels):
    x = torch.randn(2, channels, 4, 5, requires_grad=True)
    ours = channel_max(x)
    assert torch.equal(ours, x.amax(1, keepdim=True))
    (grad_ours,) = torch.autograd.grad((ours * torch.arange(20.0).view(4, 5)).sum(), x)
    (grad_amax,) = torch.autograd.grad((x.amax(1, keepdim=True) * torch.arange(20.0).view(4, 5)).sum(), x)
    assert torch.equal(grad_ours, grad_amax)


@pytest.mark.parametrize("block", [lambda: SqueezeExcite(24), lambda: CBAM(24), lambda: CBAM(24, identity_init=True)])
def test_inplace_blocks_overwrite_their_input_only_in_inference(block):
    torch.manual_seed(0)
    plain = block().eval()
    inplace = block().eval()
    inplace.load_state_dict(plain.state_dict())
    inplace.inplace = True
    x = torch.randn(2, 24, 6, 6, requires_grad=True)
    out = inplace(x)  # autograd on: x is left alone, the gradient is the plain block's
    assert torch.equal(out, plain(x))
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(plain(x).sum(), x)[0])
    with torch.no_grad():
        x = torch.randn(2, 24, 6, 6)
        before = x.clone()
        expected = plain(x)
        assert torch.equal(x, before)  # the plain block leaves its input alone
        assert inplace(x) is x and torch.equal(x, expected)  # the in-place one writes its output into it


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("channels", [5, 64])
def test_cbam_cpu_path_equals_the_paper_path_in_values_and_gradients(channels, identity):
    torch.manual_seed(0)
    block = CBAM(channels, reduction=4, identity_init=identity).train()
    if identity:  # a trained blend, not the identity start's exact copy of x
        with torch.no_grad():
            block.gamma_channel.fill_(0.7)
            block.gamma_spatial.fill_(0.4)
    x = torch.randn(3, channels, 7, 9, requires_grad=True)
    paper, cpu = block.forward_paper(x), block.forward_cpu(x)
    torch.testing.assert_close(cpu, paper, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(paper)
    grads = [torch.autograd.grad((y * weights).sum(), [x, *block.parameters()]) for y in (paper, cpu)]
    for g_paper, g_cpu in zip(*grads):
        torch.testing.assert_close(g_cpu, g_paper, rtol=1e-4, atol=1e-5)
    assert torch.equal(block(x.detach()), block.forward_cpu(x.detach()))  # the CPU runs the CPU path


def test_block_placement_writes_in_place_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = make("resnet", "cbam", "block").eval()
    blocks = [m for m in model.modules() if isinstance(m, CBAM)]
    assert blocks and all(b.inplace for b in blocks)
    assert not any(m.inplace for m in make("resnet", "cbam", "stage").modules() if isinstance(m, CBAM))
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        fast = model(x)
        for b in blocks:
            b.inplace = False
        assert torch.equal(fast, model(x))


# ---- placement in every family: identity start, untouched weights ----

@pytest.mark.parametrize("family,method,placement", list(combos()))
def test_identity_init_gives_exactly_the_plain_logits(family, method, placement):
    torch.manual_seed(0)
    plain = make(family).eval()
    model = make(family, method, placement, init="identity").eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {k for k in new_names(model, plain) if not k.endswith("num_batches_tracked")}
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("family,method,placement", [("resnet", "cbam", "block"), ("efficientnet", "se", "block"),
                                                     ("regnet", "residual", "block"), ("convnext", "cbam", "stage"),
                                                     ("resnet", "gate", "stage"), ("efficientnet", "stn", "stage")])
def test_pretrained_weights_load_untouched(tmp_path, family, method, placement):
    """Backbone weights from a file: every backbone tensor keeps its name and value; only attention is new
    and `pretrained_names` excludes it (so the trainer gives it new_lr_mult)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    name, args = FAMILIES[family]
    source = timm.create_model(name, num_classes=5, **args)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    plain = make(family, weights=str(path))
    model = make(family, method, placement, weights=str(path))
    state = model.state_dict()
    head = source.pretrained_cfg.get("classifier", "fc")
    for key, value in source.state_dict().items():
        if not key.startswith(head):
            assert torch.equal(state[f"net.{key}"], value), key
    new = new_names(model, plain)
    assert new and all(k.startswith(("attention.", "gated.", "stn.")) or ".se." in k or ".attn." in k for k in new)
    params = {n for n, _ in model.named_parameters()}
    assert model.pretrained_names == plain.pretrained_names
    assert model.pretrained_names == {n for n in params if n.startswith("net.") and n not in new
                                      and not n.startswith(f"net.{head}")}


def test_deepcopy_keeps_each_copy_on_its_own_blocks():
    """EMA copies the model: the copy's stage hooks must run the copy's attention blocks."""
    import copy

    model = make("resnet", "cbam", "stage").eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
        for p in twin.attention.parameters():
            p.add_(1.0)
        assert not torch.equal(model(x), twin(x))


def test_existing_block_se_is_kept_and_followed():
    """test_efficientnet blocks with their own SE keep it (pretrained), the new block runs after it."""
    model = make("efficientnet", "cbam", "block", stages=[-1])
    blocks = [m for m in model.net.modules() if hasattr(m, "attn")]
    assert blocks and all(type(b.se).__name__ == "SqueezeExcite" and isinstance(b.attn, CBAM) for b in blocks)


# ---- training, recipes, recorder, errors ----

@pytest.mark.parametrize("family,method,placement", list(combos()))
def test_each_method_trains_a_few_steps(family, method, placement):
    torch.manual_seed(0)
    model = make(family, method, placement).train()
    attn = {n: p.detach().clone() for n, p in model.named_parameters() if n not in model.pretrained_names
            and not n.startswith(f"net.{model.net.pretrained_cfg.get('classifier', 'fc')}")}
    attn = {n: p for n, p in attn.items() if not n.startswith("net.") or ".se." in n or ".attn." in n}
    assert attn
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, SIDE, SIDE), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in attn.items())


@pytest.mark.parametrize("method", ["se", "cbam", "residual", "gate", "stn"])
def test_synthetic_attention_recipes_build_a_working_model(method):
    cfg = load_recipe([f"recipe=synth_{method}"])
    assert cfg.model.attention.type == method
    model = build_model(cfg.model, num_classes=4, image_size=cfg.data.image_size)
    assert model(torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)).shape == (2, 4)


def test_recorder_returns_maps_with_stage_and_stride():
    side = 64
    x = torch.randn(2, 3, side, side)
    model = make("resnet", "cbam", "block", stages=[1, 2, 3, 4]).eval()
    with AttentionRecorder(model) as rec, torch.no_grad():
        model(x)
    reductions = {i: f["reduction"] for i, f in enumerate(model.net.feature_info)}
    channels = {i: f["num_chs"] for i, f in enumerate(model.net.feature_info)}
    spatial = [r for r in rec.records if r.kind == "spatial"]
    channel = [r for r in rec.records if r.kind == "channel"]
    assert {r.stage for r in spatial} == {1, 2, 3, 4} and len(spatial) == len(channel)
    for r in spatial:
        assert r.value.shape == (2, 1, side // reductions[r.stage], side // reductions[r.stage])
        assert r.stride == reductions[r.stage]
    for r in channel:
        assert r.value.shape == (2, channels[r.stage])
    recorded = len(rec.records)
    with torch.no_grad():
        model(x)
    assert len(rec.records) == recorded  # hooks removed on exit: nothing more is recorded

    for method, kinds in (("residual", {"mask", "spatial"}), ("gate", {"spatial"}), ("stn", {"theta", "grid"})):
        model = make("resnet", method, stages=[-3, -2]).eval()
        with AttentionRecorder(model) as rec, torch.no_grad():
            model(x)
        assert {r.kind for r in rec.records} == kinds
        for r in rec.records:
            if r.kind == "spatial":
                assert r.value.shape[-1] * r.stride == side and r.stage in (2, 3)
            if r.kind == "grid":
                assert r.value.shape == (2, 1, side, side, 2)  # (B, N transformers, H, W, 2)


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(family="convnext", method="cbam", placement="block"), "placement=stage"),
    (dict(family="resnet", method="gate", stages=[-1]), "no other stage"),
    (dict(family="resnet", method="cbam", stages=[7]), "has stages 0..4"),
    (dict(family="resnet", method="cbam", placement="block", stages=[0]), "has none"),
    (dict(family="resnet", method="sqeeze"), "is unknown"),
])
def test_bad_combinations_raise_one_sentence(kwargs, phrase):
    with pytest.raises(UserError, match=phrase):
        make(**kwargs)


def test_transformer_backbone_is_refused():
    with pytest.raises(UserError, match="plain vision transformer.*use model.attention.type=none"):
        Classifier("test_vit", 5, attention="cbam", image_size=SIDE)


@pytest.mark.parametrize("a,bx,by", [(0.0, 0.0, 0.0), (1e6, 1e6, -1e6), (-1e6, 5.0, 5.0), (3.0, -40.0, 2.0)])
def test_stn_window_is_bounded_and_starts_at_identity(a, bx, by):
    from fgvc.models.attention.stn import MIN_SCALE, Localization

    loc = Localization()
    with torch.no_grad():
        loc.fc[-1].bias.copy_(torch.tensor([a, bx, by]))
    theta = loc(torch.randn(2, 3, 32, 32))[:, 0]  # the one transformer's (B, 2, 3)
    s, tx, ty = theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 2]
    assert torch.equal(theta[:, 0, 0], theta[:, 1, 1]) and not theta[:, 0, 1].any() and not theta[:, 1, 0].any()
    assert (s >= MIN_SCALE - 1e-6).all() and (s <= 1.5).all() and torch.isfinite(theta).all()
    zoom_in = s < 1
    assert ((tx.abs() <= (1 - s).clamp(min=0) + 1e-6) & (ty.abs() <= (1 - s).clamp(min=0) + 1e-6)).all()
    if (a, bx, by) == (0.0, 0.0, 0.0):
        assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3))
    if a > 100:
        assert zoom_in.all() and torch.allclose(s, torch.full_like(s, MIN_SCALE))
