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

from fgvc.analysis.cost import count_flops
from fgvc.analysis.coarse_fine import (COLUMNS, FILES, coarse_fine_rows, read_csv,
                                       read_plot_points, write_report)
from fgvc.errors import UserError
from fgvc.engine.losses import DcnLoss
from fgvc.models.dcn import ALWAYS_EXIT, DCN, NEVER_EXIT, choose_threshold, entropy_saliency, escalate

ROOT = Path(__file__).resolve().parent.parent
IMAGE = 64  # input side
COARSE = 32  # coarse input side: test_resnet's first 3 levels (stride 8) give a 4x4 grid
GRID = 4
CELL = IMAGE // GRID  # input pixels per coarse position
PATCH = 24  # overlapping patches: each reaches (PATCH - CELL) / 2 pixels into its neighbours
NUM_CLASSES = 5


def tiny_dcn(**kw) -> DCN:
    torch.manual_seed(0)
    args = dict(image_size=IMAGE, coarse_backbone="test_resnet", coarse_stages=3, coarse_image_size=COARSE,
                fine_backbone="test_efficientnet", patch_size=PATCH, top_k=3)
    return DCN(NUM_CLASSES, **(args | kw)).eval()


@pytest.fixture(scope="module")
def model() -> DCN:
    return tiny_dcn()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def test_k_all_positions_equals_fine_network_on_every_patch(model, x):
    """Reference path: cut every coarse cell's patch with F.unfold (an independent implementation of
    the patch grid), run the fine network on all of them, classify. The DCN path with k = h*w must
    give the same logits."""
    offset = (PATCH - CELL) // 2  # the patch of cell j starts at j*CELL - offset
    cols = F.unfold(F.pad(x, (offset,) * 4), PATCH, stride=CELL)  # (B, 3*P*P, h*w)
    b = x.shape[0]
    patches = cols.transpose(1, 2).reshape(b * GRID * GRID, 3, PATCH, PATCH)
    with torch.no_grad():
        fine = model.fine_vectors(patches).view(b, GRID * GRID, -1)  # (B, h*w, C), row-major cells
        mixed = fine.transpose(1, 2).reshape(b, -1, GRID, GRID)
        reference = model.head(mixed)
        out = model(x, top_k=GRID * GRID)
    assert out.positions.shape == (b, GRID * GRID)
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    # the boxes are the unfold windows, in input pixels
    pos = out.positions[0]
    expect = torch.stack([(pos % GRID) * CELL - offset, (pos // GRID) * CELL - offset], -1).float()
    torch.testing.assert_close(out.boxes[0, :, :2], expect)
    torch.testing.assert_close(out.boxes[0, :, 2:] - out.boxes[0, :, :2], torch.full_like(expect, PATCH))


def test_k_zero_is_exactly_the_coarse_path(model, x):
    with torch.no_grad():
        out = model(x, top_k=0)
        coarse = model.head(model.coarse_features(x))
    assert torch.equal(out.logits, coarse)
    assert torch.equal(out.coarse_logits, coarse)
    assert out.named_logits().keys() == {"coarse"}


def test_flops_grow_linearly_with_k(model, x):
    one = x[:1]
    f1, f2, f3 = (count_flops(lambda t, k=k: model(t, top_k=k), one) for k in (1, 2, 3))
    assert f2 - f1 > 0
    assert f3 - f2 == f2 - f1
    per_patch = count_flops(model.fine_vectors, torch.zeros(1, 3, PATCH, PATCH))
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
    terms = DcnLoss(hint_weight=1.0, coarse_weight=0.5)(out, torch.tensor([0, 1, 2]))
    assert terms.keys() == {"loss", "ce", "hint", "coarse_ce"}
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["hint"] + 0.5 * terms["coarse_ce"])
    terms["hint"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.coarse.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.fine.parameters())


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

    with pytest.raises(UserError, match="model.dcn.saliency='gate'"):
        load_recipe(["recipe=synth_dcn", "model.dcn.saliency=gate"])
    with pytest.raises(UserError, match="model.dcn.coarse_stages"):
        tiny_dcn(coarse_stages=9)


def test_recipes_build_the_model_and_loss():
    from fgvc.config import load_recipe
    from fgvc.engine.losses import build_criterion
    from fgvc.models.build import build_model

    for name, whole in (("synth_dcn", False), ("synth_dcn_fine", True)):
        cfg = load_recipe([f"recipe={name}"])
        net = build_model(cfg.model, 12, cfg.data.image_size)
        assert isinstance(net, DCN) and net.whole_image is whole
        assert isinstance(build_criterion(cfg), DcnLoss)
    for name in ("cub_dcn", "cars_dcn"):  # real-data recipes resolve (weights are not fetched here)
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.model.arch == "dcn" and cfg.data.image_size == 448


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


def test_report_rows_from_a_model_and_loaders(model, tmp_path):
    rows = coarse_fine_rows(model, _loader(12, 2), NUM_CLASSES, _loader(8, 3), ks=[1, model.top_k],
                            shares=(0.5,), costs=(0.35,), thresholds=(NEVER_EXIT,), batch=4, min_run_time=0.01)
    kinds = [r.kind for r in rows]
    assert kinds == ["coarse", "fine-untrained", "dcn", "dcn", "exit", "exit", "exit"]
    assert "untrained" in rows[1].label
    given = rows[4]  # threshold above 1: every test image takes the dcn path at the recipe's k
    assert given.threshold == NEVER_EXIT and given.escalated == 1.0 and given.top1 == rows[3].top1
    assert given.gflops == pytest.approx(rows[3].gflops)
    assert all(r.chosen_on.startswith("val") for r in rows[5:])
    write_report(rows, tmp_path, "test", 4)
    assert len(check_report_files(tmp_path)) == len(rows)


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
           "--shares", "0.5", "--thresholds", "2", "--batch", "4", "--min-run-time", "0.01"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all((tiny_dcn_run / name).is_file() for name in FILES)
    rows = check_report_files(tiny_dcn_run)
    assert [r["kind"] for r in rows] == ["coarse", "fine-untrained", "dcn", "dcn", "exit", "exit", "exit"]
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
