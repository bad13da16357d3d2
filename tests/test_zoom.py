"""RA-CNN (fgvc/models/zoom.py): the zoom, the boxes, the losses, the schedule, DDP, the recipes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fgvc.config import available_recipes, load_recipe
from fgvc.engine.losses import ZoomLoss, build_criterion, build_schedule, ranking_loss, true_class_probability
from fgvc.engine.runs import load_run
from fgvc.errors import UserError
from fgvc.models.build import build_model
from fgvc.models.zoom import (APN, CLS, JOINT, PRETRAIN, RACNN, ZoomOutput, ZoomSchedule, box_from_raw, compose_boxes,
                              peak_response_box, zoom, zoom_phase)

from conftest import TINY_DATA, accelerate_launch

STEEP = 1e4  # a mask this steep is exactly 0/1 at pixel centres in float32: a hard crop
SIZE, CLASSES = 32, 5  # tiny model input


def tiny_racnn(**kwargs) -> RACNN:
    torch.manual_seed(0)
    return RACNN("test_resnet", CLASSES, **{"image_size": SIZE, "scales": 3, **kwargs})


def pixel_box(x1: int, y1: int, side: int, image_side: int) -> list[float]:
    """A square on pixel edges as (cx, cy, half) in fractions of the image side."""
    return [(x1 + side / 2) / image_side, (y1 + side / 2) / image_side, side / 2 / image_side]


# --- the differentiable zoom ------------------------------------------------------------------


@pytest.mark.parametrize("out_size", [16, 32, 48, 80])  # shrink, copy, enlarge, enlarge by a non-integer
def test_zoom_of_integer_box_equals_hard_crop_and_resize(out_size):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    corners = [(8, 16, 32), (0, 40, 24), (20, 0, 44)]  # (x1, y1, side); the last two touch the border
    boxes = torch.tensor([pixel_box(x, y, s, 64) for x, y, s in corners])
    zoomed = zoom(images, boxes, out_size, STEEP)
    for i, (x, y, s) in enumerate(corners):
        crop = images[i:i + 1, :, y:y + s, x:x + s]
        expected = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", align_corners=False)
        torch.testing.assert_close(zoomed[i:i + 1], expected, atol=1e-5, rtol=0)


def test_antialiased_zoom_reads_narrow_boxes_pixel_for_pixel_and_shrinks_wide_ones_without_a_moire():
    """model.zoom.sampler=antialias: a box of at most the output's side in source pixels is the
    bilinear zoom itself; the whole image is its antialiased shrink (the first scale's reading); a
    box between the two is the mix of both readings (resample.mip_mix); a one-pixel checkerboard
    read whole at 2/3 of its side averages out where the bilinear zoom shows a moire."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 48)
    narrow = torch.tensor([pixel_box(4, 8, 32, 48), pixel_box(10, 0, 20, 48)])  # 32 and 20 source px
    torch.testing.assert_close(zoom(images, narrow, 32, STEEP, "antialias"), zoom(images, narrow, 32, STEEP))
    whole = torch.tensor([pixel_box(0, 0, 48, 48)] * 2)
    expected = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(zoom(images, whole, 32, STEEP, "antialias"), expected, atol=1e-5, rtol=0)
    middle = torch.tensor([pixel_box(0, 0, 40, 48)] * 2)  # 40 px: w = (40/32 - 1) / (48/32 - 1) = 1/2
    crop = images[:, :, :40, :40]
    sharp = F.interpolate(crop, size=(32, 32), mode="bilinear", align_corners=False)
    smooth = F.interpolate(F.interpolate(crop, size=(48, 48), mode="bilinear", align_corners=False),
                           size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(zoom(images, middle, 32, STEEP, "antialias"), (sharp + smooth) / 2, atol=1e-5, rtol=0)
    checker = ((torch.arange(48)[:, None] + torch.arange(48)[None, :]) % 2).float().expand(1, 3, 48, 48)
    assert (zoom(checker, whole[:1], 32, STEEP, "antialias") - 0.5).abs().max() < 0.05
    assert (zoom(checker, whole[:1], 32, STEEP) - 0.5).abs().max() > 0.1
    model = build_model(load_recipe(["recipe=synth_racnn", "model.zoom.sampler=antialias", f"data.image_size={SIZE}",
                                     "model.weights="]).model, CLASSES, SIZE)
    assert model.sampler == "antialias"


def test_zoom_of_a_zoom_equals_one_zoom_into_the_composed_box():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    outer = torch.tensor([pixel_box(16, 8, 32, 64)] * 2)  # 32 px box -> 32 px: an exact crop
    inner = torch.tensor([pixel_box(8, 4, 16, 32)] * 2)  # 16 px of that -> 16 px
    twice = zoom(zoom(images, outer, 32, STEEP), inner, 16, STEEP)
    once = zoom(images, compose_boxes(outer, inner), 16, STEEP)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=0)
    torch.testing.assert_close(once, images[:, :, 12:28, 24:40], atol=1e-5, rtol=0)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _apn_says(apn, raw: list[float]) -> None:
    """Make an APN output the raw box `raw` (centre x, centre y, half side) whatever it reads."""
    with torch.no_grad():
        apn.fc[-1].weight.zero_()
        apn.fc[-1].bias.copy_(torch.tensor(raw))


def test_every_scale_is_cut_once_from_the_full_resolution_image():
    """Input 64 px, network input 32 px (data.full_resolution = 2). Zoom 1: the 48-px box at (8, 8);
    zoom 2: the middle-top third of that crop, i.e. the 16-px box at (24, 16) of the ORIGINAL. Each
    scale must equal the hard crop of the original enlarged once, not a crop of the enlarged crop."""
    model = tiny_racnn(min_side=0.25, mask_steepness=STEEP).eval()  # half side in [1/8, 1/2]
    # box_from_raw: half = 1/8 + 3/8 sigmoid(r_l), centre = half + (1 - 2 half) sigmoid(r_c)
    _apn_says(model.apns[0], [0.0, 0.0, _logit(2 / 3)])  # half 3/8 (48 px), centre (1/2, 1/2)
    _apn_says(model.apns[1], [0.0, _logit(1 / 4), _logit(1 / 9)])  # half 1/6, centre (1/2, 1/3) of crop 1
    seen = []
    scale = model._scale
    model._scale = lambda s, image, frozen: (seen.append(image), scale(s, image, frozen))[1]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    crop_resize = lambda y0, x0, side: F.interpolate(x[:, :, y0:y0 + side, x0:x0 + side], size=(SIZE, SIZE),  # noqa: E731
                                                    mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[0], F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True))
    torch.testing.assert_close(seen[1], crop_resize(8, 8, 48), atol=1e-4, rtol=0)
    torch.testing.assert_close(seen[2], crop_resize(16, 24, 16), atol=1e-4, rtol=0)
    # the old way (a crop of the already resampled first zoom) gives other, blurrier pixels
    twice = zoom(seen[1], torch.tensor([[0.5, 1 / 3, 1 / 6]] * 2), SIZE, STEEP)
    assert (twice - seen[2]).abs().max() > 0.05
    torch.testing.assert_close(out.boxes[1], torch.tensor([[32.0, 24.0, 8.0]] * 2), atol=1e-3, rtol=0)  # pixels of x


def test_the_default_box_floor_is_the_reference_one():
    """min_side 2/3 by default (schema, model, every RA-CNN recipe): an APN pushing its boxes to the
    smallest gets half sides of 1/3 of the current scale, so zoom 2 still covers 4/9 of the image."""
    assert tiny_racnn().apns[0].min_side == pytest.approx(2 / 3)
    for name in ("cub_racnn", "cars_racnn", "synth_racnn"):
        assert load_recipe([f"recipe={name}"]).model.zoom.min_side == pytest.approx(2 / 3), name
    model = tiny_racnn().eval()
    for apn in model.apns:
        _apn_says(apn, [0.0, 0.0, -1e4])  # the smallest box the APN can ask for
    with torch.no_grad():
        out = model(torch.rand(2, 3, 48, 48))
    first, second = (2 * b[:, 2] for b in out.boxes)  # box sides in pixels of the 48-px input
    torch.testing.assert_close(first, torch.full((2,), 48 * 2 / 3))
    torch.testing.assert_close(second, torch.full((2,), 48 * 4 / 9))


def test_gradient_of_the_zoom_reaches_every_box_parameter():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    raw = torch.randn(4, 3, requires_grad=True)  # what an APN outputs
    out = zoom(images, box_from_raw(raw, 0.25), 24, steepness=10.0)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(raw.grad).all()
    assert (raw.grad.abs() > 0).all(), raw.grad  # centre x, centre y and half side of every image


def test_gradient_of_the_ranking_loss_reaches_the_apns_and_boxes():
    model = tiny_racnn()
    model.train()
    out = model(torch.randn(4, 3, SIZE, SIZE))  # JOINT: no schedule, boxes live
    p_t = [true_class_probability(y, torch.zeros(4, dtype=torch.long)) for y in out.scale_logits]
    (ranking_loss(p_t[0], p_t[1], 1.0) + ranking_loss(p_t[1], p_t[2], 1.0)).backward()
    for apn in model.apns:
        assert apn.fc[-1].weight.grad is not None and apn.fc[-1].weight.grad.abs().sum() > 0


# --- boxes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_side", [0.1, 0.25, 0.5, 1.0])
def test_boxes_stay_inside_the_image_and_above_the_floor(min_side):
    torch.manual_seed(0)
    raw = torch.cat([torch.randn(200, 3) * 20,  # random and extreme APN outputs
                     torch.tensor([[1e6, 1e6, 1e6], [-1e6, -1e6, -1e6], [1e6, -1e6, -1e6],
                                   [math.inf, -math.inf, -math.inf], [0.0, 0.0, -math.inf]])])
    box = box_from_raw(raw, min_side)
    cx, cy, half = box.unbind(1)
    assert torch.isfinite(box).all()
    assert (2 * half >= min_side - 1e-6).all() and (half <= 0.5 + 1e-6).all()
    for c in (cx, cy):
        assert (c - half >= -1e-6).all() and (c + half <= 1 + 1e-6).all()


def test_model_boxes_in_input_pixels_stay_inside_and_above_the_floor():
    model = tiny_racnn(min_side=0.5).eval()
    for apn in model.apns:  # an APN gone wild
        torch.nn.init.normal_(apn.fc[-1].weight, std=100.0)
        torch.nn.init.normal_(apn.fc[-1].bias, std=100.0)
    with torch.no_grad():
        out = model(torch.randn(8, 3, 40, 40))  # boxes are in the pixels of this input, not SIZE
    assert len(out.boxes) == 2
    for z, xyxy in enumerate(out.zoom_boxes_xyxy()):
        assert (xyxy >= -1e-4).all() and (xyxy <= 40 + 1e-4).all()
        side = xyxy[:, 2] - xyxy[:, 0]
        torch.testing.assert_close(side, xyxy[:, 3] - xyxy[:, 1])  # square
        assert (side >= 40 * 0.5 ** (z + 1) - 1e-4).all()  # the floor is relative to each zoom's input
    # zoom 2 lies inside zoom 1
    outer, inner = out.zoom_boxes_xyxy()
    assert (inner[:, :2] >= outer[:, :2] - 1e-4).all() and (inner[:, 2:] <= outer[:, 2:] + 1e-4).all()


def test_initial_box_is_centred_on_the_strongest_response_and_inside():
    feats = torch.zeros(2, 4, 8, 8)
    feats[0, :, 3, 5] = 1.0  # row 3, column 5
    feats[1, :, 0, 0] = 1.0  # a corner: the box must be shifted inside
    box = peak_response_box(feats, 0.25)
    torch.testing.assert_close(box[0], torch.tensor([5.5 / 8, 3.5 / 8, 0.25]))
    torch.testing.assert_close(box[1], torch.tensor([0.25, 0.25, 0.25]))


# --- losses -----------------------------------------------------------------------------------


def test_ranking_loss_is_zero_when_the_finer_scale_wins_by_the_margin_and_positive_otherwise():
    margin = 0.05
    coarse = torch.tensor([0.3, 0.3, 0.3, 0.9])
    torch.testing.assert_close(ranking_loss(coarse, coarse + margin + 0.01, margin), torch.tensor(0.0))
    torch.testing.assert_close(ranking_loss(coarse, coarse, margin), torch.tensor(margin))  # a tie costs the margin
    torch.testing.assert_close(ranking_loss(coarse, coarse - 0.2, margin), torch.tensor(0.2 + margin))
    # through logits: p_t is the softmax probability of the true class
    target = torch.tensor([1, 0])
    logits_coarse = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # p_t = 0.5
    logits_fine = torch.tensor([[0.0, 4.0], [4.0, 0.0]])  # p_t = 0.982
    p_c, p_f = true_class_probability(logits_coarse, target), true_class_probability(logits_fine, target)
    assert ranking_loss(p_c, p_f, margin) == 0
    assert ranking_loss(p_f, p_c, margin) > 0
    soft = F.one_hot(target, 2).float()  # mixup targets give the same p_t for one-hot rows
    torch.testing.assert_close(true_class_probability(logits_fine, soft), p_f)


def test_loss_terms_are_named_and_weighted_by_phase():
    model = tiny_racnn()
    loss = ZoomLoss(rank_margin=0.05, rank_weight=2.0)
    model.train()
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    names = {"loss", "ce_scale0", "ce_scale1", "ce_scale2", "ce_fused", "rank", "apn_init"}
    for phase in (PRETRAIN, CLS, APN):
        t = loss(model(x, phase=phase), y)
        assert set(t) == names  # the same names in every phase, for logging
        ce = t["ce_scale0"] + t["ce_scale1"] + t["ce_scale2"] + t["ce_fused"]
        expected = {PRETRAIN: ce + t["apn_init"], CLS: ce, APN: 2.0 * t["rank"]}[phase]
        torch.testing.assert_close(t["loss"].detach(), expected)


# --- the output dataclass ---------------------------------------------------------------------


@pytest.mark.parametrize("scales,share,fuse", [(2, False, "features"), (3, False, "scores"), (3, True, "features")])
def test_output_has_one_entry_per_scale_and_a_box_per_zoom(scales, share, fuse):
    model = tiny_racnn(scales=scales, share_backbone=share, fuse=fuse).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert isinstance(out, ZoomOutput) and out.phase == JOINT
    assert out.logits.shape == (2, CLASSES)
    assert len(out.scale_logits) == scales and all(y.shape == (2, CLASSES) for y in out.scale_logits)
    assert len(out.boxes) == scales - 1 and all(b.shape == (2, 3) for b in out.boxes)
    assert list(out.named_logits()) == [f"scale{s}" for s in range(scales)]
    assert len(model.backbones) == (1 if share else scales)
    if fuse == "scores":
        torch.testing.assert_close(out.logits, sum(out.scale_logits))


def test_pretrained_names_cover_exactly_the_backbones(tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "backbone.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(weights))
    model = RACNN("test_resnet", CLASSES, image_size=SIZE, scales=2, weights=str(weights))
    names = {n for n, _ in model.named_parameters()}
    assert model.pretrained_names == {n for n in names if n.startswith("backbones.")}
    assert model.pretrained_names < names  # APNs, classifiers and the fusion get new_lr_mult
    assert RACNN("test_resnet", CLASSES, image_size=SIZE, scales=2).pretrained_names == set()


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="model.zoom.scales"):
        load_recipe(["recipe=synth_racnn", "model.zoom.scales=4"])
    with pytest.raises(UserError, match="model.zoom.min_side"):
        load_recipe(["recipe=synth_racnn", "model.zoom.min_side=0.0"])


# --- the schedule -----------------------------------------------------------------------------


def test_phases_follow_the_schedule():
    got = [zoom_phase(u, pretrain_updates=3, cls_steps=2, apn_steps=1) for u in range(10)]
    assert got == [PRETRAIN] * 3 + [CLS, CLS, APN] * 2 + [CLS]
    assert zoom_phase(5, 0, 3, 0) == CLS and zoom_phase(5, 0, 0, 3) == APN


def test_the_schedule_is_the_one_owner_of_the_phase_and_the_loss_follows_the_output():
    schedule = ZoomSchedule(pretrain_updates=1, cls_steps=1, apn_steps=1)
    assert [schedule.phase(u) for u in range(4)] == [PRETRAIN, CLS, APN, CLS]
    model, loss = tiny_racnn().train(), ZoomLoss(rank_weight=3.0)
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long)
    out = model(x, phase=schedule.phase(2))
    assert out.phase == APN
    t = loss(out, y)
    torch.testing.assert_close(t["loss"].detach(), 3.0 * t["rank"])
    assert model(x).phase == JOINT  # no phase given (evaluation, analysis): the joint loss


def _grads_after_step(model, loss, schedule, update):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(update)
    out = model(torch.randn(4, 3, SIZE, SIZE), phase=schedule.phase(update))
    loss(out, torch.randint(0, CLASSES, (4,)))["loss"].backward()
    groups = {"backbones": [], "classifiers": [], "apns": [], "fusion": []}
    for name, p in model.named_parameters():
        groups[name.split(".")[0]].append(p.grad is not None and bool(p.grad.abs().sum() > 0))
    return {k: (all(v), any(v)) for k, v in groups.items()}  # (every param has a grad, some param has)


@pytest.mark.parametrize("share", [False, True])
def test_each_phase_updates_only_its_parameters(share):
    model = tiny_racnn(share_backbone=share)
    loss, schedule = ZoomLoss(), ZoomSchedule(pretrain_updates=1, cls_steps=1, apn_steps=1)
    model.train()
    pre, cls, apn = (_grads_after_step(model, loss, schedule, u) for u in range(3))
    # (an APN's last layer starts at zero, so at first only that layer has a non-zero gradient)
    # pretraining: classifiers, backbones, fusion from the CE terms; the APNs from their regression
    assert pre["backbones"][1] and pre["classifiers"][0] and pre["fusion"][0] and pre["apns"][1]
    # classification: boxes fixed -> no APN gradient
    assert cls["backbones"][1] and cls["classifiers"][0] and cls["fusion"][0] and not cls["apns"][1]
    # proposal: ranking loss only -> APNs alone
    assert apn["apns"][1]
    assert not apn["backbones"][1] and not apn["classifiers"][1] and not apn["fusion"][1]


def test_every_racnn_recipe_loads_and_synth_racnn_builds():
    names = [r for r in available_recipes() if r.endswith("_racnn")]
    assert {"synth_racnn", "cub_racnn", "cars_racnn"} <= set(names)
    for name in names:
        cfg = load_recipe([f"recipe={name}"])
        assert cfg.model.arch == "racnn" and cfg.model.zoom.scales in (2, 3)
    cfg = load_recipe(["recipe=synth_racnn"])
    model = build_model(cfg.model, CLASSES, cfg.data.image_size)
    assert isinstance(model, RACNN) and isinstance(build_criterion(cfg), ZoomLoss)
    schedule = build_schedule(cfg, updates_per_epoch=7)
    assert schedule.pretrain_updates == cfg.train.zoom.pretrain_epochs * 7
    assert schedule.cls_steps == cfg.train.zoom.cls_steps and schedule.apn_steps == cfg.train.zoom.apn_steps
    assert build_schedule(load_recipe(["recipe=synth_baseline"]), 7) is None  # no phases outside RA-CNN


# --- several processes ------------------------------------------------------------------------


def _ddp_phases_worker():
    """Each rank: a tiny RA-CNN under DDP with find_unused_parameters, one update per phase."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    # the launcher forks this pytest process: a state an earlier test made in it (one process) must
    # not be inherited, or the Accelerator below would see one rank
    AcceleratorState._reset_state(reset_partial_state=True)

    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model = tiny_racnn()
    loss, schedule = ZoomLoss(), ZoomSchedule(pretrain_updates=1, cls_steps=1, apn_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    raw = acc.unwrap_model(model)
    model.train()
    for update in range(5):  # pretrain, cls, apn, cls, apn
        phase = schedule.phase(update)
        torch.manual_seed(100 * acc.process_index + update)  # different data per rank
        before = {n: p.detach().clone() for n, p in raw.named_parameters()}
        terms = loss(model(torch.randn(4, 3, SIZE, SIZE), phase=phase), torch.randint(0, CLASSES, (4,)))
        acc.backward(terms["loss"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if phase == APN:  # backbones and classifiers sat out: unchanged
            for n, p in raw.named_parameters():
                if not n.startswith("apns."):
                    assert torch.equal(p, before[n]), n
    flat = torch.cat([p.detach().flatten() for p in raw.parameters()])
    gathered = acc.gather(flat[None])
    assert torch.equal(gathered[0], gathered[1]), "the ranks' weights drifted apart"


@pytest.mark.slow
def test_ddp_two_processes_through_every_phase():
    from accelerate import debug_launcher

    debug_launcher(_ddp_phases_worker, num_processes=2)


@pytest.mark.slow
def test_synth_racnn_trains_with_two_processes(tmp_path, synth_root):
    out = tmp_path / "racnn"
    # the tiny set is written at 48 px: full_resolution 1.5 delivers those pixels to a 32-px network
    proc = accelerate_launch("train.py", "recipe=synth_racnn", "train.epochs=2", "train.zoom.pretrain_epochs=1",
                             "train.zoom.cls_steps=1", "train.zoom.apn_steps=1", f"output_dir={out}",
                             f"data.root={synth_root}", *TINY_DATA, "data.full_resolution=1.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1_scale0", "top1_scale1", "top1_scale2"} <= set(metrics["test"])
    run = load_run(out)
    assert run.cfg.data.full_resolution == 1.5 and run.image_size == 32
    with torch.no_grad():
        boxes = run.model(torch.rand(1, 3, 48, 48)).boxes
    assert all(0 < float(b[0, 2]) <= 24 for b in boxes)  # in pixels of the 48-px delivered image


def test_a_racnn_run_folder_written_before_the_new_keys_still_loads(tmp_path):
    """recipe.yaml and model.json of an older run lack data.full_resolution and
    model.attention.stn_count and hold the old floor model.zoom.min_side 0.25: the run loads with it."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    cfg = OmegaConf.to_container(load_recipe(["recipe=synth_racnn", f"data.image_size={SIZE}"]))
    del cfg["data"]["full_resolution"], cfg["model"]["attention"]["stn_count"]
    cfg["model"]["zoom"]["min_side"] = 0.25
    (tmp_path / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    meta = {"model": cfg["model"], "num_classes": CLASSES, "class_names": list("abcde"), "part_names": [],
            "image_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3, "data": "synthetic"}
    (tmp_path / "model.json").write_text(json.dumps(meta))
    save_file(tiny_racnn(min_side=0.25).state_dict(), str(tmp_path / "model.safetensors"))
    run = load_run(tmp_path)
    assert all(apn.min_side == 0.25 for apn in run.model.apns) and run.cfg.data.full_resolution == 1.0


# --- per-scale ranking margins and proposal learning rates (train.zoom.rank_margins, apn_lr_mults) ---


def test_per_pair_margins_give_each_pair_its_own_ranking_loss_and_default_to_the_single_margin():
    from fgvc.engine.losses import ranking_loss, true_class_probability

    model = tiny_racnn().train()
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    out = model(x, phase=APN)
    p = [true_class_probability(logits, y) for logits in out.scale_logits]
    pairs = ZoomLoss(rank_margins=(0.05, 0.3))(out, y)
    torch.testing.assert_close(pairs["rank"], (ranking_loss(p[0], p[1], 0.05) + ranking_loss(p[1], p[2], 0.3)).detach())
    torch.testing.assert_close(ZoomLoss(rank_margin=0.2)(out, y)["rank"],
                               ZoomLoss(rank_margin=0.7, rank_margins=(0.2, 0.2))(out, y)["rank"])
    assert ZoomLoss(rank_margin=0.05)(out, y)["rank"] != pairs["rank"]


def test_apn_lr_mults_scale_only_their_proposal_network_and_default_keeps_every_group():
    from fgvc.config import load_recipe
    from fgvc.engine.optim import build_optimizer
    from fgvc.models.build import build_model

    def lrs(overrides):
        cfg = load_recipe(["recipe=synth_racnn", "model.weights=", *overrides])
        model = build_model(cfg.model, CLASSES, 64)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr"] for g in build_optimizer(model, cfg.train).param_groups for p in g["params"]}

    base = lrs([])
    assert lrs(["train.zoom.apn_lr_mults=[1.0,1.0]"]) == base
    scaled = lrs(["train.zoom.apn_lr_mults=[0.1,2.0]"])
    for name, lr in base.items():
        mult = 0.1 if name.startswith("apns.0.") else 2.0 if name.startswith("apns.1.") else 1.0
        assert scaled[name] == pytest.approx(lr * mult), name
    assert any(n.startswith("apns.1.") for n in base)


def test_per_scale_zoom_settings_need_one_value_per_zoom():
    from fgvc.config import load_recipe
    from fgvc.errors import UserError

    with pytest.raises(UserError, match="one value >= 0 per zoom"):
        load_recipe(["recipe=synth_racnn", "train.zoom.rank_margins=[0.05]"])
    with pytest.raises(UserError, match="apn_lr_mults"):
        load_recipe(["recipe=synth_racnn", "train.zoom.apn_lr_mults=[1.0,-1.0]"])
    cfg = load_recipe(["recipe=synth_racnn", "train.zoom.rank_margins=[0.05,0.2]"])
    assert list(cfg.train.zoom.rank_margins) == [0.05, 0.2]
