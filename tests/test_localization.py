"""Part localization: maps of every model family, scores, baselines, drawing, the script."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import TINY_DATA, execute_notebook, run_script
from fgvc.analysis.drawing import ImageView, draw_grid, save_figure, to_display
from fgvc.analysis.localization import (box_iou, box_masks, centre_gaussian, energy_in_box, peaks, pointing_game,
                                        random_maps, render_html, score_maps)
from fgvc.analysis.maps import FAMILY_SOURCES, compute_maps, model_family, unwarp
from fgvc.config import load_recipe
from fgvc.data.transforms import PairedTransform
from fgvc.models.build import build_model

SIDE = 32


def gaussian_at(points: torch.Tensor, side: int, sigma: float = 1.5) -> torch.Tensor:
    """(B, 2) points -> (B, side, side) maps peaking on the pixel that holds each point."""
    c = torch.arange(side).float() + 0.5
    x, y = c[None, None, :], c[None, :, None]
    px, py = points[:, 0].floor()[:, None, None] + 0.5, points[:, 1].floor()[:, None, None] + 0.5
    return torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2))


# ---------------------------------------------------------------------------------------------
# Scores on the synthetic set, where the parts that carry the class are known


@pytest.fixture(scope="module")
def synth_test(synth_root):
    from fgvc.data.build import build_datasets

    cfg = load_recipe(["recipe=synth_baseline", f"data.root={synth_root}", *TINY_DATA])
    data = build_datasets(cfg.data, 0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    items = [data.test[i] for i in range(len(data.test))]
    return data.index.part_names, torch.stack([b["box"] for b in items]).float(), \
        torch.stack([b["parts"] for b in items]).float()


def test_map_on_the_annotated_part_scores_one_and_a_corner_map_zero(synth_test):
    names, boxes, parts = synth_test
    beak = names.index("beak")
    seen = parts[:, beak, 2] > 0  # the centre crop cuts the beak off a few birds
    boxes, parts = boxes[seen], parts[seen]
    assert len(boxes) >= 10
    on_beak = gaussian_at(parts[:, beak, :2], SIDE)
    scores = score_maps(on_beak, boxes, parts, 0.1, class_parts=[beak])
    assert scores["pointing"].tolist() == [1.0] * len(boxes)
    assert scores["pointing_class_parts"].tolist() == [1.0] * len(boxes)
    assert scores["part_hits"][:, beak].tolist() == [1.0] * len(boxes)
    corner = gaussian_at(torch.zeros(len(boxes), 2), SIDE)
    scores = score_maps(corner, boxes, parts, 0.1, class_parts=[beak])
    assert scores["pointing"].tolist() == [0.0] * len(boxes)
    assert torch.nan_to_num(scores["part_hits"], nan=0.0).sum() == 0


def test_invisible_parts_and_missing_boxes_are_not_scored():
    parts = torch.tensor([[[10.0, 10.0, 0.0]], [[10.0, 10.0, 1.0]]])  # (B=2, P=1, 3)
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [math.nan] * 4])
    maps = gaussian_at(torch.tensor([[10.0, 10.0], [10.0, 10.0]]), SIDE)
    s = score_maps(maps, boxes, parts)
    assert math.isnan(s["pointing"][0]) and math.isnan(s["pointing"][1])  # part hidden / no radius
    assert math.isnan(s["energy_in_box"][1]) and math.isnan(s["box_iou"][1])
    no_parts = score_maps(maps, boxes, torch.zeros(2, 0, 3))
    assert set(no_parts) == {"energy_in_box", "box_iou"}  # box scores only


def test_box_scores_of_a_map_that_is_the_box():
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0]])
    inside = box_masks(boxes, SIDE, SIDE).float()
    assert inside.sum() == 16 * 24
    assert energy_in_box(inside, boxes).item() == 1.0
    assert box_iou(inside, boxes).item() == 1.0
    assert peaks(gaussian_at(torch.tensor([[7.2, 3.9]]), SIDE)).tolist() == [[7.5, 3.5]]


# ---------------------------------------------------------------------------------------------
# Baselines


def test_random_map_points_as_often_as_parts_cover_the_image():
    """E[pointing game of an i.i.d. map] = share of pixels within the radius of a visible part."""
    n = 4000
    parts = torch.tensor([[8.0, 8.0, 1.0], [24.0, 20.0, 1.0], [3.0, 30.0, 0.0]]).expand(n, 3, 3)
    boxes = torch.tensor([[2.0, 2.0, 30.0, 26.0]]).expand(n, 4)
    radius = 0.1 * math.hypot(28, 24)
    x = torch.arange(SIDE).float() + 0.5
    px, py = x[None, :].expand(SIDE, SIDE), x[:, None].expand(SIDE, SIDE)
    near = ((px - 8) ** 2 + (py - 8) ** 2 <= radius**2) | ((px - 24) ** 2 + (py - 20) ** 2 <= radius**2)
    expected = near.float().mean().item()
    maps = random_maps(n, SIDE, SIDE, torch.Generator().manual_seed(0))
    s = score_maps(maps, boxes, parts)
    tol = 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(s["pointing"].mean().item() - expected) < tol
    box_share = 28 * 24 / SIDE**2
    assert abs(s["energy_in_box"].mean().item() - box_share) < 0.005  # E[energy] = the box's area share


def test_centre_gaussian_energy_matches_its_integral():
    side, sigma = 64, 0.25
    box = (10.0, 20.0, 40.0, 60.0)
    g = centre_gaussian(1, side, side, sigma)
    s = sigma * side

    def mass(a, b):  # integral of exp(-(t - side/2)^2 / 2s^2) over [a, b]
        return math.erf((b - side / 2) / (s * math.sqrt(2))) - math.erf((a - side / 2) / (s * math.sqrt(2)))

    analytic = mass(box[0], box[2]) * mass(box[1], box[3]) / mass(0, side) ** 2
    numeric = energy_in_box(g, torch.tensor([box])).item()
    assert abs(numeric - analytic) < 2e-3
    parts = torch.tensor([[[33.0, 31.0, 1.0], [5.0, 5.0, 1.0]]])
    assert pointing_game(peaks(g), parts, torch.tensor([3.0])).item() == 1.0  # peak on the centre
    assert pointing_game(peaks(g), parts[:, 1:], torch.tensor([3.0])).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Keypoints follow resizing and cropping exactly into the drawn picture


def _bright_square(h: int, w: int, x0: int, y0: int, size: int) -> np.ndarray:
    img = np.full((h, w, 3), 30, np.uint8)
    img[y0:y0 + size, x0:x0 + size] = 250
    return img


def _centroid(display: np.ndarray) -> tuple[float, float]:
    weight = np.clip(display.mean(2) - display.mean(2).min(), 0, None)
    weight = np.where(weight > 0.5 * weight.max(), weight, 0)
    ys, xs = np.mgrid[: weight.shape[0], : weight.shape[1]] + 0.5
    return float((xs * weight).sum() / weight.sum()), float((ys * weight).sum() / weight.sum())


@pytest.mark.parametrize("train", [False, True])
def test_keypoints_follow_resize_and_crop_into_the_drawing(train):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = _bright_square(90, 130, 70, 40, 12)  # the square's centre is the keypoint (76, 46)
    parts = np.array([[76.0, 46.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    box = np.array([60.0, 30.0, 40.0, 35.0], np.float32)
    t = PairedTransform(48, train, mean, std, crop_scale=(0.6, 0.9), hflip=1.0 if train else 0.0)
    t.set_random_seed(3)
    tensor, box_t, parts_t = t(image, box, parts)
    display = to_display(tensor, mean, std)
    assert parts_t[0, 2] == 1 and parts_t[1, 2] == 0
    cx, cy = _centroid(display)
    assert abs(cx - parts_t[0, 0].item()) < 0.5 and abs(cy - parts_t[0, 1].item()) < 0.5

    view = ImageView(image=display, title="t", parts=parts_t.numpy(), box=box_t.numpy(),
                     maps={"m": gaussian_at(parts_t[None, 0, :2], 48)[0].numpy()})
    fig = draw_grid([view], ["a", "b"], radius_fraction=0.1)
    ax = fig.axes[0]
    assert ax.images[0].get_extent() == [0, 48, 48, 0]  # pixel i covers [i, i + 1), as the keypoints
    assert np.allclose(ax.collections[0].get_offsets(), parts_t[:1, :2].numpy())  # only the visible part
    x1, y1, x2, y2 = box_t.tolist()
    rect = ax.patches[0]
    assert np.allclose([rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()], [x1, y1, x2 - x1, y2 - y1])
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Every map source of every model family, at input resolution


FAMILIES = {
    "plain": (["recipe=synth_baseline"], {"cam", "gradcam"}),
    "se": (["recipe=synth_se"], {"cam", "gradcam"}),  # channel weights only: no spatial map
    "cbam": (["recipe=synth_cbam"], {"cam", "gradcam", "cbam_stage1", "cbam_stage2", "cbam_stage3", "cbam_stage4"}),
    "residual": (["recipe=synth_residual"], None),
    "gate": (["recipe=synth_gate"], None),
    "stn": (["recipe=synth_stn"], {"cam", "gradcam", "stn_region"}),
    "racnn": (["recipe=synth_racnn"], {"cam", "gradcam", "zoom1", "zoom2"}),
    "dcn": (["recipe=synth_dcn", "model.dcn.fine_backbone=test_resnet",
             "model.dcn.fine_weights=weights/fractal_test_resnet.safetensors", "model.dcn.patch_size=16"],
            {"cam", "gradcam", "dcn_saliency"}),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_map_source_gives_maps_at_input_resolution(name):
    args, expected = FAMILIES[name]
    cfg = load_recipe([*args, "model.backbone=test_resnet", f"data.image_size={SIDE}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, SIDE).eval()
    images = torch.randn(2, 3, SIDE, SIDE)
    out = compute_maps(model, images)
    kind = cfg.model.attention.type
    if expected is None:  # one map per attention stage
        expected = {"cam", "gradcam"} | {f"{kind}_stage{i}" for i in range(1, 5)} & set(out.maps)
        assert any(k.startswith(kind) for k in out.maps)
    assert set(out.maps) == expected
    for map_name, m in out.maps.items():
        assert m.shape == (2, SIDE, SIDE) and m.dtype == torch.float32, map_name
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1, map_name
    assert out.logits.shape == (2, 3)
    family = model_family(model)
    assert set(FAMILY_SOURCES[family]) >= {"cam", "gradcam"}
    if family == "racnn":
        assert len(out.zoom_boxes) == 2 and out.zoom_boxes[0].shape == (2, 4)
    if family == "dcn":
        assert out.patches is not None and out.patches.shape[-1] == 4


def test_unwarp_puts_a_transformed_point_back_where_the_transformer_looked():
    """STN: output pixel u samples the input at A u + t; a peak at u must come back at A u + t."""
    theta = torch.tensor([[[0.5, 0.0, 0.25], [0.0, 0.5, -0.25]]])  # zoom x2 onto the upper right
    warped = gaussian_at(torch.tensor([[16.0, 16.0]]), SIDE)  # peak at the output's centre, u = (0, 0)
    back = unwarp(warped, theta)
    px, py = peaks(back)[0].tolist()
    assert abs(px - (0.25 + 1) * SIDE / 2) <= 1 and abs(py - (-0.25 + 1) * SIDE / 2) <= 1


# ---------------------------------------------------------------------------------------------
# The script, the page, the notebook


def test_localize_writes_pictures_page_and_scores(tiny_run, tmp_path):
    out = tmp_path / "loc"
    proc = run_script("localize.py", str(tiny_run), "--num-images", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "localization.json").read_text())
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == report["pngs"] == ["grid_000.png", "grid_001.png"]  # 5 images, 4 rows per grid
    assert len(report["images"]) == len(report["per_image"]) == 5
    assert {"cam", "gradcam", "baseline_random", "baseline_centre"} <= set(report["sources"])
    cam = report["sources"]["cam"]
    assert cam["images"] == 5 and len(cam["part_hits"]) == 15 and "beak" in cam["part_hits"]
    assert report["class_parts"] == ["beak", "left wing", "right wing"]
    assert {"pointing", "pointing_class_parts", "energy_in_box", "box_iou"} <= set(cam)
    page = (out / "index.html").read_text()
    linked = set(re.findall(r'src="([^"]+\.png)"', page))
    assert linked == set(pngs)
    assert "cam" in proc.stdout and "baseline_centre" in proc.stdout


def test_localize_by_id_and_combined_table(tiny_run, tmp_path):
    first = run_script("localize.py", str(tiny_run), "--num-images", "2", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    ids = json.loads((tmp_path / "a" / "localization.json").read_text())["images"][::-1]
    proc = run_script("localize.py", str(tiny_run), str(tiny_run), "--ids", *ids, "--out", str(tmp_path / "b"),
                      "--sources", "cam")
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "b" / "localization.md").read_text()
    assert table.count("| cam |") == 2 and "baseline_random" in table
    one = json.loads((tmp_path / "b" / "tiny" / "localization.json").read_text())
    assert one["images"] == ids and set(one["sources"]) == {"cam", "baseline_random", "baseline_centre"}


def test_localize_refuses_unknown_ids_and_sources(tiny_run, tmp_path):
    proc = run_script("localize.py", str(tiny_run), "--ids", "no-such-id", "--out", str(tmp_path))
    assert proc.returncode != 0 and proc.stderr.startswith("error: image id 'no-such-id'")
    proc = run_script("localize.py", str(tiny_run), "--sources", "zoom", "--out", str(tmp_path))
    assert proc.returncode != 0 and "does not exist for classifier models" in proc.stderr


def test_page_of_a_set_without_parts_says_box_scores_only(tmp_path):
    maps = torch.rand(2, SIDE, SIDE)
    boxes = torch.tensor([[2.0, 2.0, 20.0, 20.0]] * 2)
    from fgvc.analysis.localization import summarise

    summary = summarise(score_maps(maps, boxes, torch.zeros(2, 0, 3)), [])
    view = ImageView(image=np.zeros((SIDE, SIDE, 3)), title="x", parts=np.zeros((0, 3)), box=boxes[0].numpy(),
                     maps={"cam": maps[0].numpy()})
    save_figure(draw_grid([view], []), tmp_path / "grid_000.png")
    report = {"run": "r", "split": "test", "data": "cars", "family": "classifier", "has_parts": False,
              "radius_fraction": 0.1, "region_threshold": 0.5, "images": ["1", "2"], "sources": {"cam": summary},
              "per_image": [{"id": "1", "true": "a", "pred": "b", "scores": {}}], "pngs": ["grid_000.png"]}
    page = render_html(report)
    assert "box scores only" in page and 'src="grid_000.png"' in page and "pointing" not in page.split("<table>")[1]


@pytest.mark.slow
def test_notebook_executes(tiny_run, tmp_path):
    nb = execute_notebook("part_localization.ipynb", {"FGVC_LOC_RUN": str(tiny_run)})
    assert (tiny_run / "localization" / "index.html").is_file()
    assert any(o.get("output_type") == "display_data" for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_peak_of_an_upsampled_coarse_map_is_its_plateau_centre_and_a_flat_map_has_none():
    from fgvc.analysis.localization import peaks

    coarse = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # the bottom-right cell is hottest
    fine = torch.nn.functional.interpolate(coarse[:, None], size=(64, 64), mode="bilinear",
                                           align_corners=False)[:, 0]
    x, y = peaks(fine)[0].tolist()
    assert x > 48 and y > 48  # inside the hot corner's plateau, not its first (top-left) pixel
    assert torch.isnan(peaks(torch.ones(1, 8, 8))).all()


@pytest.mark.parametrize("name", ["plain", "racnn", "dcn", "dcn_whole"])
def test_class_activation_maps_average_to_the_logits_they_explain(name):
    """CAM is the classifier applied before the average pool: averaging it over positions gives back
    the logits of the path it explains (Classifier: its logits; RA-CNN: scale 0; DCN: the coarse path)."""
    args = {"plain": ["recipe=synth_baseline"], "racnn": ["recipe=synth_racnn"],
            # CAM explains an average pool (with the paper's max pool the DCN's CAM is still the
            # classifier at every position, but no longer averages to the logits)
            "dcn": ["recipe=synth_dcn", "model.dcn.fine_backbone=test_resnet",
                    "model.dcn.fine_weights=weights/fractal_test_resnet.safetensors", "model.dcn.pool=avg"],
            "dcn_whole": ["recipe=synth_dcn_fine", "model.dcn.fine_backbone=test_resnet",
                          "model.dcn.fine_weights=weights/fractal_test_resnet.safetensors"]}[name]
    cfg = load_recipe([*args, f"data.image_size={SIDE}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, SIDE).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        cams, out = model.class_activation_maps(x), model(x)
    explained = {"plain": out, "racnn": getattr(out, "scale_logits", [None])[0],
                 "dcn": getattr(out, "coarse_logits", None), "dcn_whole": getattr(out, "logits", None)}[name]
    assert cams.shape[:2] == (2, 3)
    torch.testing.assert_close(cams.mean((2, 3)), explained, rtol=1e-4, atol=1e-5)


def test_the_peak_drawn_is_the_peak_scored(tmp_path):
    coarse = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    m = torch.nn.functional.interpolate(coarse[:, None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0]
    view = ImageView(image=np.zeros((SIDE, SIDE, 3), np.float32), title="t", box=np.array([0, 0, SIDE, SIDE], float),
                     parts=np.zeros((0, 3)), maps={"cam": m[0].numpy()})
    fig = draw_grid([view], [])
    marks = [line for line in fig.axes[1].lines if line.get_marker() == "+"]
    assert len(marks) == 1
    drawn = (marks[0].get_xdata()[0], marks[0].get_ydata()[0])
    assert drawn == pytest.approx(tuple(peaks(m).squeeze(0).tolist()))
    r, c = np.unravel_index(int(m[0].argmax()), (SIDE, SIDE))
    assert drawn != pytest.approx((c + 0.5, r + 0.5))  # not the plateau's first pixel (an argmax)
    save_figure(fig, tmp_path / "peak.png")
