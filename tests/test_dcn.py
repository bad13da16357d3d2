"""Dynamic Capacity Networks: the model's paths agree, costs scale as claimed, early exit
and saliency behave, and the coarse-fine report's table, CSV and plot agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import execute_notebook
import torch
import torch.nn.functional as F

from fgvc.analysis.coarse_fine import (COLUMNS, FILES, Row, coarse_fine_rows, cost_line, cost_rows, dcn_logits, markdown,
                                       read_csv, read_plot_points, write_csv, write_report)
from fgvc.analysis.cost import count_flops
from fgvc.errors import UserError
from fgvc.engine.losses import DcnLoss
from fgvc.models.dcn import (ALWAYS_EXIT, DCN, FINE, JOINT, NEVER_EXIT, PAPER, SELECT, DcnSchedule, DcnStep, cam_saliency,
                             choose_positions, choose_threshold, entropy_saliency, escalate)

ROOT = Path(__file__).resolve().parent.parent
IMAGE = 64  # input side
COARSE = 32  # coarse input side: test_resnet's first 3 levels (stride 8) give a 4x4 grid
GRID = 4
CELL = IMAGE // GRID  # input pixels per coarse position
PATCH = 24  # overlapping patches: each reaches (PATCH - CELL) / 2 pixels into its neighbours
NUM_CLASSES = 5


TINY = dict(image_size=IMAGE, coarse_backbone="test_resnet", coarse_stages=3, coarse_image_size=COARSE,
            fine_backbone="test_efficientnet", patch_size=PATCH, top_k=3, exit_threshold=NEVER_EXIT, whole_image=False,
            pretrained=False, pool="avg", coarse_weights="", fine_weights="", **PAPER)


def tiny_dcn(**kw) -> DCN:
    torch.manual_seed(0)
    return DCN(NUM_CLASSES, **(TINY | kw)).eval()


DESIGNS = {"mix-avg": dict(), "mix-max": dict(pool="max"), "fuse": dict(top_layers="fuse"),
           "fuse-linear": dict(top_layers="fuse", top_hidden=False, saliency="cam")}


@pytest.fixture(scope="module")
def model() -> DCN:
    return tiny_dcn()


@pytest.fixture(scope="module", params=list(DESIGNS))
def design(request) -> DCN:
    """The DCN under each choice of top layers: the paper's mix (average or max pool), fuse, and fuse
    without the hidden layers (pool and classify, patch vectors attention-pooled as they are)."""
    return tiny_dcn(**DESIGNS[request.param])


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def test_k_all_positions_equals_fine_network_on_every_patch(design, x):
    """Reference path: cut every coarse cell's patch with F.unfold (an independent implementation of
    the patch grid), run the fine network on all of them, decide. The DCN path with k = h*w (its
    positions in saliency order, not row-major) must give the same logits."""
    model = design
    offset = (PATCH - CELL) // 2  # the patch of cell j starts at j*CELL - offset
    cols = F.unfold(F.pad(x, (offset,) * 4), PATCH, stride=CELL)  # (B, 3*P*P, h*w)
    b = x.shape[0]
    patches = cols.transpose(1, 2).reshape(b * GRID * GRID, 3, PATCH, PATCH)
    with torch.no_grad():
        fine = model.fine_vectors(patches).view(b, GRID * GRID, -1)  # (B, h*w, C), row-major cells
        if model.fusion is None:  # mix: every coarse cell replaced by its fine vector
            reference = model.head(fine.transpose(1, 2).reshape(b, -1, GRID, GRID))
        else:  # fuse: the coarse global vector with all patch vectors
            reference = model.fusion(model.head.vector(model.coarse_features(x)), fine)[0]
        out = model(x, top_k=GRID * GRID)
    assert out.positions.shape == (b, GRID * GRID)
    assert not torch.equal(out.positions[0], torch.arange(GRID * GRID))  # order differs; the result must not
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    # the boxes are the unfold windows, in input pixels
    pos = out.positions[0]
    expect = torch.stack([(pos % GRID) * CELL - offset, (pos // GRID) * CELL - offset], -1).float()
    torch.testing.assert_close(out.boxes[0, :, :2], expect)
    torch.testing.assert_close(out.boxes[0, :, 2:] - out.boxes[0, :, :2], torch.full_like(expect, PATCH))


def test_k_zero_is_exactly_the_coarse_path(design, x):
    model = design
    with torch.no_grad():
        out = model(x, top_k=0)
        coarse = model.head(model.coarse_features(x))
    assert torch.equal(out.logits, coarse)
    assert torch.equal(out.coarse_logits, coarse)
    assert out.named_logits().keys() == {"coarse"}


def test_flops_grow_linearly_with_k(design, x):
    model, one = design, x[:1]
    f1, f2, f3 = (count_flops(lambda t, k=k: model(t, top_k=k), one) for k in (1, 2, 3))
    assert f2 - f1 > 0
    assert f3 - f2 == f2 - f1
    per_patch = count_flops(model.fine_vectors, torch.zeros(1, 3, PATCH, PATCH))
    if model.fusion is not None:  # and the patch vector's attention layers
        patch = model.fusion.patch or torch.nn.Identity()  # the hidden layer, if the design has it
        per_patch += count_flops(lambda v: model.fusion.score(patch(v)), torch.zeros(1, model.width))
    assert f2 - f1 == per_patch  # each extra position costs exactly one fine patch


def test_thresholds_above_one_escalate_all_and_below_zero_none(model, x):
    logits = torch.randn(64, NUM_CLASSES) * 5
    assert escalate(logits, 1.0 + 1e-6).all() and escalate(logits, NEVER_EXIT).all()
    assert not escalate(logits, -1e-6).any() and not escalate(logits, ALWAYS_EXIT).any()
    with torch.no_grad():
        full = model(x).logits
        coarse = model(x, top_k=0).logits
        all_fine, up = model.early_exit(x, NEVER_EXIT)
        assert up.all()
        torch.testing.assert_close(all_fine, full, rtol=1e-4, atol=1e-5)
        none_fine, up = model.early_exit(x, ALWAYS_EXIT)
        assert not up.any() and torch.equal(none_fine, coarse)


def test_early_exit_mixes_per_image_and_forward_gate_agrees(x):
    gated = tiny_dcn(exit_threshold=0.5)
    with torch.no_grad():
        coarse = gated(x, top_k=0).logits
        t = float(coarse.softmax(-1).amax(-1).median())  # some images stop, some go on
        gated.exit_threshold = t
        up = escalate(coarse, t)
        assert up.any() and not up.all()
        logits, up2 = gated.early_exit(x, t)
        assert torch.equal(up, up2)
        torch.testing.assert_close(logits, gated(x).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(logits[~up], coarse[~up])


def test_threshold_is_chosen_for_a_share_of_validation_images():
    val = torch.randn(200, NUM_CLASSES) * 3
    for share in (0.0, 0.1, 0.25, 0.5, 1.0):
        t = choose_threshold(val, share)
        assert int(escalate(val, t).sum()) == round(share * len(val))
    assert choose_threshold(val, 1.0) > 1 and choose_threshold(val, 0.0) < 0


def test_saliency_leaves_no_gradient_and_works_under_no_grad(x):
    net = tiny_dcn().train()
    with torch.no_grad():
        out = net(x)
    assert out.saliency.shape == (x.shape[0], GRID, GRID) and (out.saliency > 0).any()
    assert all(p.grad is None for p in net.parameters())
    # inside a graph, too: saliency alone leaves nothing on any parameter, and does not cut the graph
    feats = net.coarse_features(x)
    sal = entropy_saliency(net.head, feats)
    assert not sal.requires_grad and all(p.grad is None for p in net.parameters())
    eval_sal = net.eval()(x).saliency
    torch.testing.assert_close(entropy_saliency(net.head, net.coarse_features(x)), eval_sal)


def test_loss_terms_and_hint_reaches_only_the_coarse_network(x):
    net = tiny_dcn().train()
    out = net(x)
    terms = DcnLoss(hint_weight=1.0, coarse_weight=0.5, fine_weight=0.25)(out, torch.tensor([0, 1, 2]))
    assert terms.keys() == {"loss", "ce", "hint", "coarse_ce", "fine_ce"}
    assert terms["fine_ce"] > 0  # the patch branch has its own prediction in training
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["hint"] + 0.5 * terms["coarse_ce"]
                               + 0.25 * terms["fine_ce"])
    terms["hint"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.coarse.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.fine.parameters())


def test_detached_fusion_trains_the_networks_only_through_their_own_branches(x):
    """detach_fusion: the fused prediction's loss reaches its classifier and nothing before it; the
    coarse and patch branches' losses still reach their networks. Without it, it reaches both."""
    for detach in (True, False):
        net = tiny_dcn(top_layers="fuse", top_hidden=False, saliency="cam", detach_fusion=detach).train()
        out = net(x)
        out.logits.sum().backward()
        fused = net.fusion.fused_classifier.weight.grad
        assert fused is not None and fused.abs().sum() > 0
        for branch in (net.coarse, net.fine):
            reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
            assert reached != detach
        net.zero_grad(set_to_none=True)
        out = net(x)
        (out.coarse_logits.sum() + out.fine_logits.sum()).backward()
        for branch in (net.coarse, net.fine):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


def test_recipe_defaults_are_the_design_that_trains_and_old_runs_rebuild_as_trained(tmp_path):
    """`model.arch=dcn` alone gets the top layers that trained on the benchmark (models/dcn.py); a run
    saved before top_hidden / detach_fusion existed rebuilds with the paper's top layers it was trained
    with (its head.conv weights load)."""
    from omegaconf import OmegaConf

    from fgvc.config import load_recipe, to_yaml
    from fgvc.models.build import build_model

    cfg = load_recipe(["model.arch=dcn"])
    d = cfg.model.dcn
    assert (d.top_layers, d.top_hidden, d.detach_fusion, d.pool, d.saliency) == ("fuse", False, True, "avg", "cam")
    assert cfg.train.dcn.hint_weight == 0
    saved = OmegaConf.create(to_yaml(load_recipe(["model.arch=dcn", "model.dcn.top_layers=mix", "model.dcn.pool=max"])))
    del saved.model.dcn["top_hidden"], saved.model.dcn["detach_fusion"]
    old = tmp_path / "old.yaml"
    old.write_text(OmegaConf.to_yaml(saved))
    again = load_recipe(recipe_file=old)
    assert again.model.dcn.top_hidden is True and again.model.dcn.detach_fusion is False
    again.model.weights = ""  # the default recipe's classifier weights; a dcn names its two files instead
    assert build_model(again.model, NUM_CLASSES, IMAGE).head.conv is not None


def test_a_classifier_run_saved_under_the_old_dcn_defaults_still_loads(tmp_path):
    """A plain classifier's recipe.yaml holds the model.dcn section with its day's defaults (saliency
    entropy, pool max); those keys are not the classifier's, so the changed defaults must not stop
    `evaluate`, `localize` or `recipe=runs/x/recipe.yaml` from loading it."""
    from omegaconf import OmegaConf

    from fgvc.config import UserError, load_recipe, to_yaml

    saved = OmegaConf.create(to_yaml(load_recipe(["recipe=synth_baseline"])))
    saved.model.dcn.saliency, saved.model.dcn.pool = "entropy", "max"  # the defaults before issue 14
    old = tmp_path / "recipe.yaml"
    old.write_text(OmegaConf.to_yaml(saved))
    again = load_recipe(recipe_file=old)
    assert again.model.arch == "classifier" and again.model.dcn.saliency == "cam"
    # a recipe the user writes is still checked: the key is set for an arch that ignores it
    with pytest.raises(UserError, match="model.dcn.saliency"):
        load_recipe(["recipe=synth_baseline", "model.dcn.saliency=entropy"])


def test_whole_image_counterpart_has_the_same_head_shape(x):
    dcn, whole = tiny_dcn(), tiny_dcn(whole_image=True)
    assert whole.coarse is None
    assert whole.head.classifier.weight.shape == dcn.head.classifier.weight.shape
    out = whole(x)
    assert out.logits.shape == (x.shape[0], NUM_CLASSES) and out.named_logits() == {}
    terms = DcnLoss()(out, torch.tensor([0, 1, 2]))
    assert torch.equal(terms["loss"], terms["ce"])


def test_user_errors_name_the_key():
    from fgvc.config import load_recipe

    with pytest.raises(UserError, match="'model.dcn.saliency' is 'gate' but must be one of: entropy, cam"):
        load_recipe(["recipe=synth_dcn", "model.dcn.saliency=gate"])
    with pytest.raises(UserError, match="model.dcn.coarse_stages"):
        tiny_dcn(coarse_stages=9)
    with pytest.raises(UserError, match="train.dcn.k_min"):
        load_recipe(["recipe=synth_dcn", "train.dcn.k_min=5", "train.dcn.k_max=3"])
    with pytest.raises(UserError, match="train.dcn.random_share"):
        load_recipe(["recipe=synth_dcn", "train.dcn.random_share=1.5"])


def test_recipes_build_the_model_and_loss():
    from fgvc.config import load_recipe
    from fgvc.engine.losses import build_criterion
    from fgvc.models.build import build_model

    for name, whole in (("synth_dcn", False), ("synth_dcn_fine", True)):
        cfg = load_recipe([f"recipe={name}"])
        net = build_model(cfg.model, 12, cfg.data.image_size)
        assert isinstance(net, DCN) and net.whole_image is whole
        assert isinstance(build_criterion(cfg), DcnLoss)
    from fgvc.engine.losses import build_schedule

    cfg = load_recipe(["recipe=synth_dcn", "model.dcn.top_layers=fuse", "model.dcn.pool=max", "train.dcn.k_max=8",
                       "train.dcn.fine_epochs=2", "train.dcn.fine_weight=0.5", "seed=4"])
    net = build_model(cfg.model, 12, cfg.data.image_size)
    assert net.fusion is not None and net.head.pool == "max" and build_criterion(cfg).fine_weight == 0.5
    assert build_schedule(cfg, 10) == DcnSchedule(top_k=1, k_min=1, k_max=8, random_share=0.25, fine_updates=20,
                                                  seed=4)
    assert build_schedule(load_recipe(["recipe=synth_dcn_fine"]), 10) is None  # nothing to schedule
    for name in ("cub_dcn", "cars_dcn"):  # real-data recipes resolve (weights are not fetched here)
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.model.arch == "dcn" and cfg.data.image_size == 448


# --- the redesign: random k, random patches, stages, CAM saliency --------------------------------

def test_choose_positions_keeps_the_salient_and_draws_the_rest_at_random():
    saliency = torch.rand(8, GRID, GRID, generator=torch.Generator().manual_seed(0))
    top = saliency.flatten(1).topk(5, dim=1).indices
    assert torch.equal(choose_positions(saliency, 5), top)
    torch.manual_seed(0)
    mixed = choose_positions(saliency, 5, n_random=2)  # (8, 5)
    assert torch.equal(mixed[:, :3], top[:, :3])
    assert all(len(set(row.tolist())) == 5 for row in mixed)  # distinct positions
    assert not any(set(r[3:].tolist()) & set(t[:3].tolist()) for r, t in zip(mixed, top))
    assert not torch.equal(mixed[:, 3:], top[:, 3:])  # not the next most salient: drawn


def test_schedule_draws_k_stages_and_random_share():
    sched = DcnSchedule(top_k=2, k_min=1, k_max=8, random_share=0.25, fine_updates=10, select_updates=5, seed=3)
    steps = [sched.phase(u) for u in range(400)]
    assert [s.stage for s in steps[:16]] == [FINE] * 10 + [SELECT] * 5 + [JOINT]
    assert all(s.n_random == s.top_k for s in steps[:10])  # stage 1: every patch random
    assert {s.top_k for s in steps} == set(range(1, 9))
    joint = steps[15:]
    share = sum(s.n_random for s in joint) / sum(s.top_k for s in joint)
    assert 0.2 < share < 0.3 and all(0 <= s.n_random <= s.top_k for s in joint)
    assert sched.phase(123) == steps[123]  # a function of (seed, update): every rank, and a resume, agree
    fixed = DcnSchedule(top_k=2)
    assert {fixed.phase(u) for u in range(50)} == {DcnStep(JOINT, 2, 0)}  # the old behaviour


def test_select_stage_freezes_the_fine_network(x):
    net = tiny_dcn(top_layers="fuse").train()
    out = net(x, phase=DcnStep(SELECT, 3, 1))
    DcnLoss(fine_weight=1.0)(out, torch.tensor([0, 1, 2]))["loss"].backward()
    assert all(p.grad is None for p in net.fine.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.coarse.parameters())
    net.zero_grad(set_to_none=True)
    DcnLoss(fine_weight=1.0)(net(x, phase=DcnStep(JOINT, 3, 1)), torch.tensor([0, 1, 2]))["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.fine.parameters())


def test_cam_saliency_is_the_coarse_cam_of_the_predicted_class(x):
    net = tiny_dcn(saliency="cam")
    with torch.no_grad():
        out = net(x, top_k=2)
        feats = net.coarse_features(x)
        maps = net.class_activation_maps(x)  # (B, K, h, w)
    picked = maps[torch.arange(len(x)), out.coarse_logits.argmax(-1)]
    torch.testing.assert_close(out.saliency, picked)
    assert torch.equal(out.positions, picked.flatten(1).topk(2, dim=1).indices)
    assert not cam_saliency(net.head, feats.requires_grad_(True)).requires_grad


def _quadrant_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes: a bright 12 px square somewhere in one of the four quadrants of a noisy image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g) * 0.3
    labels = torch.arange(n) % 4
    for i, c in enumerate(labels.tolist()):
        y0 = (c // 2) * IMAGE // 2 + int(torch.randint(4, IMAGE // 2 - 12, (1,), generator=g))
        x0 = (c % 2) * IMAGE // 2 + int(torch.randint(4, IMAGE // 2 - 12, (1,), generator=g))
        images[i, :, y0:y0 + 12, x0:x0 + 12] += 3.0
    return images, labels


def test_a_model_trained_with_random_k_predicts_at_every_k():
    """One model, trained with k drawn at random from 1..h*w (random patches mixed in, a first stage
    on random patches only), gives valid predictions at EVERY k: finite, one per class, and fitting
    its training images well above chance (0.25) whichever k it is asked for. (30 updates on 32
    images: this checks that every k is served, not generalisation.)"""
    torch.manual_seed(0)
    net = DCN(4, **(TINY | dict(fine_backbone="test_resnet", top_k=2, top_layers="fuse"))).train()
    images, labels = _quadrant_data(32, 0)
    sched = DcnSchedule(top_k=2, k_min=1, k_max=GRID * GRID, random_share=0.25, fine_updates=5)
    loss_fn = DcnLoss(hint_weight=0.1, coarse_weight=0.5, fine_weight=0.5)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for update in range(30):
        i = torch.arange(16) + 16 * (update % 2)
        loss = loss_fn(net(images[i], phase=sched.phase(update)), labels[i])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        for k in range(1, GRID * GRID + 1):
            logits = net(images, top_k=k).logits
            assert logits.shape == (32, 4) and torch.isfinite(logits).all()
            acc = (logits.argmax(-1) == labels).float().mean().item()
            assert acc >= 0.6, f"k={k}: top-1 {acc:.2f} on its training images (chance 0.25)"


# --- the report --------------------------------------------------------------------------------

def _loader(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    items = [{"image": torch.randn(3, IMAGE, IMAGE, generator=g), "label": i % NUM_CLASSES} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=4)


def check_report_files(out: Path) -> list[dict]:
    """The markdown table, the CSV and the plot's points hold the same rows and numbers."""
    rows = read_csv(out / "coarse_fine.csv")
    table = [line for line in (out / "coarse_fine.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(rows) > 0
    for line, row in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[COLUMNS.index("label")] == row["label"]
        for key in ("top1", "gflops", "lat_b1_ms", "params_m"):
            assert float(cells[COLUMNS.index(key)]) == pytest.approx(float(row[key]), abs=1e-2, rel=1e-3)
    points = read_plot_points(out / "coarse_fine.png")
    assert points["labels"] == [r["label"] for r in rows]
    for key in ("top1", "gflops", "lat_b1_ms"):
        assert points[key] == pytest.approx([float(r[key]) for r in rows])
    return rows


def test_report_rows_from_a_model_and_loaders(design, tmp_path):
    model = design
    rows = coarse_fine_rows(model, _loader(12, 2), NUM_CLASSES, _loader(8, 3), ks=[1, model.top_k],
                            shares=(0.5,), costs=(0.35,), thresholds=(NEVER_EXIT,), drops=(0.5,), batch=4,
                            min_run_time=0.01, rounds=1)
    kinds = [r.kind for r in rows]
    assert kinds == ["coarse", "fine-untrained", "dcn", "dcn", "exit", "exit", "exit", "exit"]
    assert [r.chosen_on for r in rows[4:]] == ["given", "val: 50% escalated", f"val: within 0.5 points of k={model.top_k}",
                                               "val: 35% of fine FLOPs"]
    assert "untrained" in rows[1].label
    given = rows[4]  # threshold above 1: every test image takes the dcn path at the recipe's k
    assert given.threshold == NEVER_EXIT and given.escalated == 1.0 and given.top1 == rows[3].top1
    assert given.gflops == pytest.approx(rows[3].gflops)
    assert all(r.chosen_on.startswith("val") for r in rows[5:])
    # every row but the fine one carries its validation top-1, measured on the validation loader
    import math
    assert math.isnan(rows[1].val_top1) and all(0 <= r.val_top1 <= 100 for r in rows if r is not rows[1])
    val_labels, val_coarse, val_by_k = dcn_logits(model, _loader(8, 3), [model.top_k])
    assert rows[0].val_top1 == pytest.approx(100 * (val_coarse.argmax(-1) == val_labels).float().mean().item())
    assert rows[3].val_top1 == pytest.approx(100 * (val_by_k[model.top_k].argmax(-1) == val_labels).float().mean().item())
    assert given.val_top1 == pytest.approx(rows[3].val_top1)  # every validation image escalated too
    write_report(rows, tmp_path, "test", 4)
    assert len(check_report_files(tmp_path)) == len(rows)


def test_cost_rows_table_and_csv_agree(tmp_path):
    dcn, whole = tiny_dcn(top_layers="fuse"), tiny_dcn(whole_image=True)
    rows = cost_rows(dcn, whole, IMAGE, ks=[1, 3], batch=2, rounds=1, min_run_time=0.01)
    assert [(r.kind, r.k) for r in rows] == [("coarse", 0), ("fine", -1), ("dcn", 1), ("dcn", 3)]
    one = torch.zeros(1, 3, IMAGE, IMAGE)
    assert rows[3].gflops * 1e9 == pytest.approx(count_flops(lambda t: dcn(t, top_k=3), one))
    assert rows[1].gflops * 1e9 == pytest.approx(count_flops(whole, one))
    assert all(r.lat_b1_ms > 0 and r.lat_batch_ms > 0 for r in rows)
    (tmp_path / "c.md").write_text(markdown(rows, "cost", 2, summary="s", note="n"))
    write_csv(rows, tmp_path / "c.csv")
    table = [line for line in (tmp_path / "c.md").read_text().splitlines() if line.startswith("| ")][1:]
    for line, row in zip(table, read_csv(tmp_path / "c.csv"), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[COLUMNS.index("label")] == row["label"]
        assert float(cells[COLUMNS.index("gflops")]) == pytest.approx(float(row["gflops"]), abs=1e-4)
    assert cost_line(rows).startswith("Against fine (whole image)") and "dcn k=3: " in cost_line(rows)


def _env() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "NO_ALBUMENTATIONS_UPDATE": "1",
                         "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_dcn_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dcn_run")
    out = tmp / "run"
    cmd = [sys.executable, str(ROOT / "fgvc" / "train.py"), "recipe=synth_dcn", f"output_dir={out}",
           "train.epochs=1", "train.batch_size=16", "data.num_workers=0", f"data.root={tmp / 'data'}",
           "data.synthetic.num_classes=4", "data.synthetic.train_per_class=6", "data.synthetic.test_per_class=3",
           "data.val_fraction=0.25"]
    done = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_report_runs_on_a_tiny_trained_run(tiny_dcn_run):
    cmd = [sys.executable, str(ROOT / "fgvc" / "report.py"), "coarse-fine", str(tiny_dcn_run), "--k", "1,2",
           "--shares", "0.5", "--thresholds", "2", "--batch", "4", "--min-run-time", "0.01", "--rounds", "1"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all((tiny_dcn_run / name).is_file() for name in FILES)
    rows = check_report_files(tiny_dcn_run)
    assert [r["kind"] for r in rows] == ["coarse", "fine-untrained", "dcn", "dcn", "exit", "exit", "exit", "exit"]
    assert [r["chosen_on"] for r in rows][-2:] == ["val: within 0.5 points of k=1", "val: 35% of fine FLOPs"]  # the synth_dcn k
    assert "coarse" in done.stdout and "Goal" in done.stdout


@pytest.mark.slow
def test_report_refuses_a_run_that_is_not_dcn(tiny_run):
    done = subprocess.run([sys.executable, str(ROOT / "fgvc" / "report.py"), "coarse-fine", str(tiny_run)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: the coarse-fine report needs a dcn model")
    assert not any((tiny_run / name).exists() for name in FILES)  # nothing written into the other run


@pytest.mark.slow
def test_notebook_executes(tiny_dcn_run, tmp_path):
    nb = execute_notebook("coarse_vs_fine.ipynb", _env() | {"FGVC_DCN_RUN": str(tiny_dcn_run), "FGVC_DCN_FINE_RUN": "",
                                                         "FGVC_REPORT_FAST": "1"})
    assert any("coarse_fine.png" in str(o) or o.get("output_type") == "display_data"
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _row(label: str, kind: str, top1: float, gflops: float, b1: float, batch: float,
         val_top1: float = float("nan")) -> Row:
    return Row(label=label, kind=kind, k=1, threshold=float("nan"), chosen_on="", escalated=1.0, top1=top1,
               mean_class_acc=top1, gflops=gflops, params_m=1.0, lat_b1_ms=b1, lat_b1_iqr_ms=0.0,
               lat_batch_ms=batch, lat_batch_iqr_ms=0.0, val_top1=val_top1)


def test_plain_goal_chooses_on_validation_and_checks_every_line():
    from fgvc.analysis.coarse_fine import accuracy_chosen, plain_goal_line

    plain = _row("plain 192 px", "fine", 89.0, 1.0, 6.0, 6.0)
    coarse = _row("coarse", "coarse", 35.0, 0.1, 1.0, 1.0, val_top1=36.0)
    k1 = _row("dcn k=1", "dcn", 86.0, 0.3, 3.0, 2.0, val_top1=86.0)  # cheapest, but 3 validation points short
    k2 = _row("dcn k=2", "dcn", 88.5, 0.38, 3.5, 2.5, val_top1=88.8)  # within 0.5 of the best on validation
    k9 = _row("dcn k=9", "dcn", 90.0, 0.9, 8.0, 7.0, val_top1=89.0)  # best on validation (and on test)
    rows = [coarse, plain, k1, k2, k9]
    assert accuracy_chosen(rows) is k2  # chosen without reading test: k9's better test top-1 is not looked at
    line = plain_goal_line(rows)
    assert "is dcn k=2, 88.50% test" in line and "-0.50 points" in line and "38% of its FLOPs" in line
    assert line.endswith("Goal reached.")
    k2.lat_b1_ms = 4.5  # 1.33x at batch 1
    line = plain_goal_line(rows)
    assert "Goal not reached (misses: 1.33x its batch-1 speed)." in line
    k2.lat_b1_ms, k2.top1 = 3.5, 87.5  # 1.5 points below the plain network
    assert "misses: -1.50 points (goal >= -1)" in plain_goal_line(rows)
    assert plain_goal_line([coarse, plain, _row("dcn k=1", "dcn", 88.0, 0.3, 3, 2)]).startswith(
        "Against the plain network: no validation split")


def test_goal_line_needs_accuracy_flops_and_both_speeds():
    from fgvc.analysis.coarse_fine import goal_line

    fine = _row("fine (whole image)", "fine", 81.0, 1.0, 10.0, 8.0)
    slow_batch = _row("dcn k=1", "dcn", 80.9, 0.2, 4.0, 5.0)  # cheapest and 2.5x at batch 1, only 1.6x at batch 32
    exit_ok = _row("exit t=0.3 k=1", "exit", 80.8, 0.3, 4.5, 3.0)  # 30% FLOPs, 2.2x and 2.7x
    line = goal_line([fine, slow_batch, exit_ok])
    assert line.startswith("Goal reached") and "exit t=0.3 k=1 (80.80%)" in line and "30% of its FLOPs" in line
    line = goal_line([fine, slow_batch])
    assert line.startswith("Goal not reached") and "dcn k=1" in line and "1.60x its large-batch speed" in line
    too_far = _row("dcn k=1", "dcn", 80.4, 0.2, 4.0, 3.0)  # 0.6 points below
    assert goal_line([fine, too_far]).startswith("Goal not reached: no dcn or early-exit setting is within 0.5")


def test_report_times_every_path_in_alternating_rounds():
    from fgvc.analysis.coarse_fine import Timed, timings

    calls: list[int] = []
    paths = [Timed(lambda x, i=i: calls.append(i), torch.zeros(4, 3, 8, 8)) for i in range(2)]
    paths.append(Timed(lambda x: calls.append(2), torch.zeros(4, 3, 8, 8), per_image=torch.zeros(2, 3, 8, 8)))
    out = timings(paths, min_run_time=0.001, rounds=2)
    runs = [c for j, c in enumerate(calls) if j == 0 or calls[j - 1] != c]  # consecutive repeats collapsed
    assert runs == [0, 1, 2, 0, 1, 2]
    assert len(out) == 3 and all(len(t) == 4 and t[0] > 0 and t[2] > 0 for t in out)


def test_threshold_for_accuracy_is_the_fewest_escalated_within_the_drop():
    from fgvc.models.dcn import threshold_for_accuracy

    g = torch.Generator().manual_seed(0)
    n, classes = 200, 5
    labels = torch.randint(0, classes, (n,), generator=g)
    coarse = torch.randn(n, classes, generator=g) * 2
    refined = torch.randn(n, classes, generator=g)
    refined[torch.arange(n), labels] += 3  # refining is right far more often than the coarse guess
    full = 100 * (refined.argmax(-1) == labels).float().mean().item()

    def exit_top1(t: float) -> tuple[float, int]:
        up = escalate(coarse, t)
        pred = torch.where(up, refined.argmax(-1), coarse.argmax(-1))
        return 100 * (pred == labels).float().mean().item(), int(up.sum())

    for drop in (0.0, 0.5, 2.0, 10.0):
        top1, escalated = exit_top1(threshold_for_accuracy(coarse, refined, labels, drop))
        assert top1 >= full - drop - 1e-6
        # brute force: no threshold escalating fewer images keeps that accuracy
        conf = coarse.softmax(-1).amax(-1).sort().values
        fewer = [exit_top1(float(c)) for c in conf[:escalated]]
        assert all(t < full - drop - 1e-6 for t, e in fewer if e < escalated)
    assert exit_top1(threshold_for_accuracy(coarse, refined, labels, 100.0))[1] == 0  # any drop allowed: none escalated
