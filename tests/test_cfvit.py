"""CF-ViT (Chen et al. 2023): the fine pass with every token re-split and no reuse is the plain ViT,
tokens follow the class attention, exits are chosen on validation only, a training step runs, the
recipes validate, and the report and maps read the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fgvc.analysis.coarse_fine import cfvit_goal_line, cfvit_logits, cfvit_rows, write_report
from fgvc.analysis.maps import compute_maps
from fgvc.config import load_recipe
from fgvc.engine.losses import CfvitLoss, build_criterion, build_schedule
from fgvc.errors import UserError
from fgvc.models.build import build_model
from fgvc.models.cfvit import (CFViT, CoarsePass, choose_tokens, class_attention, ema_over_layers, fine_indices,
                               tokens_for_share)
from fgvc.models.dcn import NEVER_EXIT, choose_threshold

IMAGE = 64  # test_vit's patch 16: a 4 x 4 fine grid, a 2 x 2 coarse grid (32 px)
NUM_CLASSES = 5


def tiny(**kw) -> CFViT:
    torch.manual_seed(0)
    return CFViT(kw.pop("backbone", "test_vit"), NUM_CLASSES, IMAGE, **kw).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# a tiny ViT with two register tokens after the class token, pooled by averaging the patch tokens,
# with and without position embeddings for the prefix tokens
TINY_VIT = dict(depth=4, embed_dim=32, num_heads=2, reg_tokens=2, global_pool="avg")
TINY = dict(depth=4, embed_dim=32, num_heads=2)
BACKBONES = {  # name: (timm model, tiny kwargs, prefix tokens)
    "test_vit": ("test_vit", {}, 1),
    "registers": ("vit_tiny_patch16_224", TINY_VIT, 3),
    "registers-no-embed-class": ("vit_tiny_patch16_224", TINY_VIT | dict(no_embed_class=True), 3),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", TINY, 2),
    "eva-01": ("eva_giant_patch14_224", TINY | dict(patch_size=16, mlp_ratio=2), 1),
}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_every_token_without_reuse_is_the_plain_vit(kind):
    """Tolerance: none. The fine pass runs timm's own modules in timm's order on the full image's
    tokens in raster order, so the logits are bitwise equal (torch.equal)."""
    backbone, kwargs, prefix = BACKBONES[kind]
    model = tiny(backbone=backbone, share=1.0, reuse=False, backbone_args=kwargs)
    assert model.num_prefix_tokens == prefix
    x = images()
    with torch.no_grad():
        plain = model.net(x)  # (B, K): the timm network alone
        out = model(x)
        assert torch.equal(out.fine_logits, plain)
        assert torch.equal(model.forward_every_token(x), plain)
    assert out.chosen.tolist() == [[0, 1, 2, 3]] * 2


def test_reuse_changes_the_fine_pass_and_share_sets_the_token_count():
    x = images()
    with torch.no_grad():
        plain = tiny(share=1.0, reuse=False).net(x)
        reused = tiny(share=1.0, reuse=True)
        assert not torch.allclose(reused(x).fine_logits, plain)
        half = tiny(share=0.5)
        assert half(x).chosen.shape == (2, 2) and half.top_k == 2
    assert [tokens_for_share(s, 49) for s in (0.0, 0.5, 1.0)] == [0, 25, 49]  # ceil, as the reference counts


def test_constructed_class_attention_picks_the_expected_tokens():
    n_prefix, n_tokens = 1, 4  # a class token and a 2 x 2 coarse grid
    attn = torch.full((1, 2, n_prefix + n_tokens, n_prefix + n_tokens), 0.2)  # (B, heads, N, N)
    attn[0, :, 0, 1:] = torch.tensor([[0.05, 0.1, 0.5, 0.15], [0.05, 0.1, 0.3, 0.35]])  # class row, per head
    score = class_attention(attn, n_prefix)  # head mean: 0.05, 0.1, 0.4, 0.25
    assert torch.allclose(score, torch.tensor([[0.05, 0.1, 0.4, 0.25]]))
    chosen, kept = choose_tokens(score, 2)
    assert chosen.tolist() == [[2, 3]] and kept.tolist() == [[0, 1]]
    # the EMA weighs later layers more: token 0 leads in the first layer, token 1 as much in the second
    g = ema_over_layers([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], decay=0.99)
    assert torch.allclose(g, torch.tensor([[0.99 * 0.01, 0.01]])) and g.argmax().item() == 1
    # coarse cells 0 and 3 of a 2 x 2 grid cover fine tokens 0, 1, 4, 5 and 10, 11, 14, 15 of the 4 x 4 grid
    assert fine_indices(torch.tensor([[3, 0]]), grid_w=2).tolist() == [[0, 1, 4, 5, 10, 11, 14, 15]]


def test_the_fine_pass_re_splits_the_tokens_the_score_ranks_first():
    model = tiny(share=0.25, reuse=False)
    x = images(1)
    with torch.no_grad():
        coarse = model.coarse_pass(x)
        for best in range(4):
            score = torch.zeros(1, 4)
            score[0, best] = 1.0
            forced = CoarsePass(coarse.prefix, coarse.tokens, coarse.features, coarse.logits, score)
            _, chosen = model.fine_pass(x, forced, 1)
            assert chosen.tolist() == [[best]]


def test_the_score_is_the_class_attention_of_the_ranking_block():
    """With one ranking block and decay 0 the score is that block's class-token attention, here
    recomputed by hand from its weights (the hook reads timm's unfused path)."""
    model = tiny(rank_layers=[1], rank_decay=0.0)
    x = images()
    with torch.no_grad():
        coarse = model.coarse_pass(x)
        net = model.net
        tokens = torch.cat([coarse.prefix, coarse.tokens], 1)  # (B, 1 + 4, C)
        h = net.norm_pre(net.patch_drop(net.pos_drop(tokens)))
        h = net.blocks[0](h)
        attn = net.blocks[1].attn
        b, n, c = h.shape
        qkv = attn.qkv(net.blocks[1].norm1(h)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        expected = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 1:].mean(1)  # (B, 4)
    assert torch.allclose(coarse.score, expected, atol=1e-6)
    assert all(blk.attn.fused_attn == type(blk.attn)(8).fused_attn for blk in net.blocks)  # restored


def test_early_exit_agrees_with_the_forward_threshold():
    model = tiny()
    x = images(4)
    with torch.no_grad():
        coarse = model(x, tokens=0).logits
        t = coarse.softmax(-1).amax(-1).median().item()
        logits, escalated = model.early_exit(x, t)
        model.exit_threshold = t
        assert torch.allclose(logits, model(x).logits, atol=1e-5)
    assert 0 < escalated.sum() < 4


def _loader(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    items = [{"image": torch.randn(3, IMAGE, IMAGE, generator=g), "label": i % NUM_CLASSES} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=4)


def test_report_exits_are_chosen_on_validation_only(tmp_path):
    model = tiny()
    val = _loader(8, 3)
    kw = dict(ks=[1, model.top_k], shares=(0.5,), drops=(), costs=(), thresholds=(NEVER_EXIT,), batch=4, min_run_time=0.01,
              rounds=1)
    rows = cfvit_rows(model, _loader(8, 2), NUM_CLASSES, val, **kw)
    assert [r.kind for r in rows] == ["coarse", "fine", "cfvit", "cfvit", "exit", "exit", "exit"]
    _, val_coarse, _ = cfvit_logits(model, val, [])
    chosen = {r.chosen_on: r.threshold for r in rows if r.kind == "exit"}
    assert chosen["val: 50% escalated"] == choose_threshold(val_coarse, 0.5)
    other_test = cfvit_rows(model, _loader(12, 7), NUM_CLASSES, val, **kw)  # another test split, same validation
    assert {r.chosen_on: r.threshold for r in other_test if r.kind == "exit"} == chosen
    given = rows[4]  # threshold above 1: every image re-splits the recipe's k tokens
    assert given.escalated == 1.0 and given.top1 == rows[3].top1 and given.gflops == pytest.approx(rows[3].gflops)
    assert rows[0].gflops < rows[2].gflops < rows[3].gflops < rows[1].gflops  # coarse < k=1 < k=2 < every token
    write_report(rows, tmp_path, "test", 4, cfvit_goal_line(rows))
    assert "Goal" in (tmp_path / "coarse_fine.md").read_text()


def test_a_training_step_on_a_tiny_vit():
    cfg = load_recipe(["recipe=synth_cfvit", f"data.image_size={IMAGE}", "train.epochs=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES, IMAGE).train()
    criterion, schedule = build_criterion(cfg), build_schedule(cfg, updates_per_epoch=10)
    assert isinstance(criterion, CfvitLoss) and schedule.select_updates == 20  # round(0.67 * 3) epochs of 10
    assert model(images(), phase=schedule.phase(0)).chosen.shape == (2, 4)  # every token first
    out = model(images(), phase=schedule.phase(20))  # then the recipe's share
    assert out.chosen.shape == (2, 2)
    terms = criterion(out, torch.tensor([0, 3]))
    assert set(terms) == {"loss", "fine_ce", "coarse_ce", "distill"} and torch.isfinite(terms["loss"])
    expected = F.cross_entropy(out.fine_logits, torch.tensor([0, 3]), label_smoothing=0.1) + terms["distill"]
    assert torch.allclose(terms["loss"], expected)  # the authors' weights: 1 * fine CE + 0 * coarse CE + 1 * KL
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.reuse[1].fc2.weight.clone()
    terms["loss"].backward()
    assert model.net.cls_token.grad is not None and model.reuse[1].fc2.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.reuse[1].fc2.weight)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, y = images(), torch.tensor([0, 3])
    grads = []
    for on in (False, True):
        model = tiny().train()
        model.net.set_grad_checkpointing(on)
        CfvitLoss()(model(x), y)["loss"].backward()
        grads.append(model.net.blocks[0].mlp.fc1.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_recipes_validate_and_mistakes_are_one_sentence():
    for name in ("synth_cfvit", "cub_cfvit"):
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.model.arch == "cfvit" and cfg.model.cfvit.share == 0.5 and cfg.model.cfvit.rank_decay == 0.99
    assert load_recipe(["recipe=cub_cfvit"]).data.image_size == 224
    with pytest.raises(UserError, match="model.arch=classifier ignores it"):
        load_recipe(["model.cfvit.share=0.25"])
    with pytest.raises(UserError, match="model.cfvit.share is 0.0"):
        load_recipe(["recipe=synth_cfvit", "model.cfvit.share=0"])
    with pytest.raises(UserError, match="rank_decay"):
        load_recipe(["recipe=synth_cfvit", "model.cfvit.rank_decay=1.0"])
    with pytest.raises(UserError, match="data.image_size=32"):
        tiny(coarse_grid=1)
    with pytest.raises(UserError, match="not a vision transformer"):
        CFViT("test_resnet", NUM_CLASSES, IMAGE)


def test_maps_mark_the_re_split_tokens():
    model = tiny(share=0.25)
    x = images()
    out = compute_maps(model, x)
    tokens = out.maps["cfvit_tokens"]  # (B, H, W)
    with torch.no_grad():
        chosen = model(x).chosen[:, 0]  # (B,) one coarse cell of 2 x 2, each 32 px
    for b, cell in enumerate(chosen.tolist()):
        r, c = divmod(cell, 2)
        assert tokens[b, 32 * r:32 * r + 32, 32 * c:32 * c + 32].eq(1).all() and tokens[b].sum() == 32 * 32
    assert out.maps["cfvit_class_attention"].shape == (2, IMAGE, IMAGE)
