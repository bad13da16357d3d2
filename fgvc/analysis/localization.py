"""Do a model's maps land on the annotated parts? Scores of (B, H, W) maps against boxes and keypoints.

All coordinates are network-input pixels, pixel i covering [i, i + 1) (the data pipeline's and
fgvc.analysis.maps' convention); maps are non-negative.

    pointing game   the map's peak (its largest pixel, at that pixel's centre) lies within
                    r = radius_fraction * box diagonal of any visible part (Zhang et al. 2016 score a
                    hit within 15 px of an object; parts are smaller, so the radius follows the bird)
    part hits       per part: share of the images where the part is visible and the peak within r of it
    energy in box   sum of the map inside the bounding box / sum of the whole map
    box IoU         IoU of the region where the map reaches REGION_THRESHOLD of its peak with the box

Baselines that look at no image: a uniform random map (i.i.d. per pixel; its pointing game is, in
expectation, the share of pixels within r of a visible part, its energy in box the box's area share)
and a centred Gaussian (the photographer's bias toward the centre).

`localize_run` wires a run folder: images, maps, scores, pictures, localization.json, index.html.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset

from fgvc.analysis.drawing import ImageView, draw_grid, save_figure, to_display
from fgvc.analysis.maps import compute_maps, model_family, peaks, pixel_centres
from fgvc.data.build import build_datasets, make_loader
from fgvc.data.synthetic import class_parts
from fgvc.engine.runs import atomic_write_text, load_run
from fgvc.errors import UserError
from fgvc.models.build import model_input
from fgvc.safe_io import check_target, make_folder, writing

POINT_RADIUS = 0.1  # pointing-game radius as a share of the box diagonal: ~30 px on a 300 px CUB bird
REGION_THRESHOLD = 0.5  # a map's region is where it reaches half its peak (CAM's 20% is for drawing boxes)
CENTRE_SIGMA = 0.25  # centred Gaussian baseline: standard deviation as a share of the input side
BASELINE_SEED = 0  # the random baseline is the same for every run scored on the same images
BASELINES = ("baseline_random", "baseline_centre")
SCORES = ("pointing", "pointing_class_parts", "energy_in_box", "box_iou")


# ---------------------------------------------------------------------------------------------
# Geometry and scores (pure functions of tensors)


def box_diagonal(boxes: Tensor) -> Tensor:
    """(B, 4) x1 y1 x2 y2 -> (B,) diagonal length; nan for images without a box."""
    return torch.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def part_hits(points: Tensor, parts: Tensor, radius: Tensor) -> Tensor:
    """(B, 2) points, (B, P, 3) parts x y visible, (B,) radius -> (B, P) float: 1 where the part is
    visible and within the radius of the point, 0 where visible and farther, nan where not visible."""
    dist = torch.hypot(parts[..., 0] - points[:, None, 0], parts[..., 1] - points[:, None, 1])  # (B, P)
    hit = (dist <= radius[:, None]).float()
    return torch.where(parts[..., 2] > 0, hit, torch.full_like(hit, math.nan))


def pointing_game(points: Tensor, parts: Tensor, radius: Tensor, which: list[int] | None = None) -> Tensor:
    """(B,) 1 if the point lies within the radius of any visible part (of `which`, default all),
    0 if not, nan for an image with none of them visible or without a box (no radius)."""
    hits = part_hits(points, parts, radius)  # (B, P)
    if which is not None:
        hits = hits[:, which]
    any_visible = ~torch.isnan(hits).all(1)
    score = torch.nan_to_num(hits, nan=0.0).amax(1) if hits.shape[1] else hits.new_zeros(len(hits))
    return torch.where(any_visible & ~torch.isnan(radius), score, torch.full_like(score, math.nan))


def box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) -> (B, H, W) bool: pixels whose centre lies inside the box (all False without a box)."""
    x, y = pixel_centres(height, width, boxes.device)
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    return (x >= x1) & (x < x2) & (y >= y1) & (y < y2)  # comparisons with nan are False


def energy_in_box(maps: Tensor, boxes: Tensor) -> Tensor:
    """(B,) share of each map's sum inside its box; nan without a box or for an all-zero map."""
    inside = box_masks(boxes, *maps.shape[-2:])
    total = maps.flatten(1).sum(1)
    share = (maps * inside).flatten(1).sum(1) / total
    no_box = torch.isnan(boxes).any(1)
    return torch.where(no_box | (total <= 0), torch.full_like(share, math.nan), share)


def box_iou(maps: Tensor, boxes: Tensor, threshold: float = REGION_THRESHOLD) -> Tensor:
    """(B,) IoU of {map >= threshold * peak} with the box's pixels; nan without a box."""
    inside = box_masks(boxes, *maps.shape[-2:])
    region = maps >= threshold * maps.flatten(1).amax(1)[:, None, None]
    inter = (region & inside).flatten(1).sum(1).float()
    union = (region | inside).flatten(1).sum(1).float()
    iou = inter / union.clamp_min(1)
    return torch.where(torch.isnan(boxes).any(1), torch.full_like(iou, math.nan), iou)


def random_maps(batch: int, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """The uniform random baseline: (B, H, W) i.i.d. U(0, 1) maps."""
    return torch.rand(batch, height, width, generator=generator)


def centre_gaussian(batch: int, height: int, width: int, sigma: float = CENTRE_SIGMA) -> Tensor:
    """The centre baseline: exp(-r^2 / (2 s^2)) around the input's centre, s = sigma * side."""
    x, y = pixel_centres(height, width)
    sx, sy = sigma * width, sigma * height
    g = torch.exp(-((x - width / 2) ** 2 / (2 * sx**2) + (y - height / 2) ** 2 / (2 * sy**2)))  # (H, W)
    return g.expand(batch, height, width).clone()


def score_maps(maps: Tensor, boxes: Tensor, parts: Tensor, radius_fraction: float = POINT_RADIUS,
               class_parts: list[int] | None = None) -> dict[str, Tensor]:
    """Every score of every image, (B,) each, plus `part_hits` (B, P). Without parts (P = 0) only
    the box scores are returned."""
    out = {"energy_in_box": energy_in_box(maps, boxes), "box_iou": box_iou(maps, boxes)}
    if parts.shape[1]:
        radius = radius_fraction * box_diagonal(boxes)
        points = peaks(maps)
        out["pointing"] = pointing_game(points, parts, radius)
        out["part_hits"] = part_hits(points, parts, radius)
        out["part_hits"][torch.isnan(radius)] = math.nan
        if class_parts:
            out["pointing_class_parts"] = pointing_game(points, parts, radius, class_parts)
    return out


def nanmean(values: Tensor) -> float | None:
    """Mean over the finite entries, None when there is none (JSON null)."""
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else None


def summarise(scores: dict[str, Tensor], part_names: list[str]) -> dict:
    """Per-image scores of one source -> {score: mean, 'part_hits': {part: rate}, 'images': n}."""
    out: dict = {name: nanmean(scores[name]) for name in SCORES if name in scores}
    if "part_hits" in scores:
        out["part_hits"] = {p: nanmean(scores["part_hits"][:, i]) for i, p in enumerate(part_names)}
    out["images"] = len(next(iter(scores.values())))
    return out


# ---------------------------------------------------------------------------------------------
# A run folder: images, maps, scores, pictures


IMAGES_PER_GRID = 4  # rows per PNG: small enough to read each map at a glance
DEFAULT_NUM_IMAGES = 16


@dataclass
class Selection:
    positions: list[int]  # indices into the split's samples
    image_ids: list[str]  # the data set's own ids of those images


def select_images(samples: list, num_images: int | None, ids: list[str] | None) -> Selection:
    """The first `num_images` of the split, or the images whose data-set ids are `ids` (in that order)."""
    if ids:
        where = {s.image_id: i for i, s in enumerate(samples)}
        missing = [i for i in ids if i not in where]
        if missing:
            raise UserError(f"image id '{missing[0]}' is not in this split; give ids from its images.txt "
                            f"(e.g. {', '.join(s.image_id for s in samples[:3])}) or use --split.")
        positions = [where[i] for i in ids]
    else:
        n = DEFAULT_NUM_IMAGES if num_images is None else num_images
        if n < 1:
            raise UserError(f"--num-images is {n} but must be at least 1.")
        positions = list(range(min(n, len(samples))))
    return Selection(positions, [samples[p].image_id for p in positions])


def localize_run(run_dir: str | Path, out_dir: str | Path | None = None, split: str = "test",
                 num_images: int | None = None, ids: list[str] | None = None, sources: list[str] | None = None,
                 radius_fraction: float = POINT_RADIUS, data_root: str | None = None, batch_size: int = 8,
                 draw: int | None = None, console=None) -> dict:
    """Maps, scores and pictures of a finished run on the chosen images; writes into `out_dir`
    (default RUN_DIR/localization) grid_NNN.png, index.html and localization.json, and returns the
    JSON content. `draw` limits the pictures to the first images (scores use all of them)."""
    say = console.print if console is not None else (lambda *a, **k: None)
    run = load_run(run_dir)
    cfg = run.cfg
    if data_root:
        cfg.data.root = data_root
    data = build_datasets(cfg.data, cfg.seed, run.mean, run.std)
    dataset = data.test if split == "test" else data.val
    if dataset is None:
        raise UserError(f"run '{run_dir}' has no validation split (data.val_fraction=0); use --split test.")
    part_names = list(data.index.part_names)
    has_parts = bool(part_names)
    if not has_parts:
        say(f"[yellow]data set '{data.index.name}' has no part annotations: box scores only "
            "(energy in box, box IoU); no pointing game or part hit rates.[/yellow]")
    class_parts_ = class_parts(cfg.data.synthetic.wing_cue) if data.index.name == "synthetic" else []
    class_idx = [part_names.index(p) for p in class_parts_] or None
    chosen = select_images(dataset.samples, num_images, ids)
    loader = make_loader(Subset(dataset, chosen.positions), batch_size, 0, False)
    out = Path(out_dir) if out_dir else Path(run_dir) / "localization"
    make_folder(out)
    for name in ("localization.json", "index.html"):  # before any work: a link there is refused now, not at the end
        check_target(out / name)

    gen = torch.Generator().manual_seed(BASELINE_SEED)
    per_source: dict[str, list[dict[str, Tensor]]] = {}
    views: list = []
    per_image: list[dict] = []
    n_draw = len(chosen.positions) if draw is None else draw
    for batch in loader:
        images, boxes, parts, labels = (model_input(run.model, batch["image"]), batch["box"].float(),
                                        batch["parts"].float(), batch["label"])
        result = compute_maps(run.model, images, sources)
        b, _, h, w = images.shape
        maps = dict(result.maps)
        maps["baseline_random"] = random_maps(b, h, w, gen)
        maps["baseline_centre"] = centre_gaussian(b, h, w)
        batch_scores = {name: score_maps(m, boxes, parts, radius_fraction, class_idx) for name, m in maps.items()}
        for name, s in batch_scores.items():
            per_source.setdefault(name, []).append(s)
        preds = result.logits.argmax(1)
        for i in range(b):
            row = len(per_image)
            record = {"id": chosen.image_ids[row], "true": run.class_names[int(labels[i])],
                      "pred": run.class_names[int(preds[i])],
                      "scores": {name: {k: _num(v[i]) for k, v in s.items() if k != "part_hits"}
                                 for name, s in batch_scores.items()}}
            per_image.append(record)
            if row < n_draw:
                views.append(ImageView(
                    image=to_display(images[i], run.mean, run.std), title=f"#{record['id']}  true: {record['true']}\n"
                    f"pred: {record['pred']}", parts=parts[i].numpy(), box=boxes[i].numpy(),
                    maps={k: v[i].numpy() for k, v in result.maps.items()},
                    zoom_boxes=[z[i].numpy() for z in result.zoom_boxes],
                    patches=None if result.patches is None else result.patches[i].numpy(),
                    scores={k: record["scores"][k] for k in result.maps}))

    summary = {name: summarise({k: torch.cat([s[k] for s in chunks]) for k in chunks[0]}, part_names)
               for name, chunks in per_source.items()}
    pngs = []
    for g in range(0, len(views), IMAGES_PER_GRID):
        path = out / f"grid_{g // IMAGES_PER_GRID:03d}.png"
        with writing(path) as tmp:
            save_figure(draw_grid(views[g:g + IMAGES_PER_GRID], part_names, radius_fraction), tmp)
        pngs.append(path.name)
    report = {"run": str(run_dir), "recipe": cfg.recipe, "family": model_family(run.model), "split": split,
              "data": data.index.name, "has_parts": has_parts, "radius_fraction": radius_fraction,
              "region_threshold": REGION_THRESHOLD, "class_parts": class_parts_,
              "images": chosen.image_ids, "sources": summary, "per_image": per_image, "pngs": pngs}
    atomic_write_text(out / "localization.json", json.dumps(report, indent=1))
    atomic_write_text(out / "index.html", render_html(report))
    return report


def _num(value: Tensor) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


# ---------------------------------------------------------------------------------------------
# Tables: rich, HTML, markdown


def score_columns(report: dict) -> list[str]:
    """The summary scores this report has, in a fixed order."""
    have = set().union(*(s.keys() for s in report["sources"].values()))
    return [c for c in SCORES if c in have]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def rich_table(report: dict):
    from rich.table import Table

    table = Table(title=f"{report['run']} — {report['split']} split, {len(report['images'])} images")
    cols = score_columns(report)
    table.add_column("map source")
    for c in cols:
        table.add_column(c, justify="right")
    for name, s in report["sources"].items():
        table.add_row(name, *(_fmt(s.get(c)) for c in cols), style="dim" if name in BASELINES else None)
    return table


def render_html(report: dict) -> str:
    """index.html: the summary table, the part hit rates, then every PNG with its images' scores."""
    esc = html.escape
    cols = score_columns(report)
    rows = "".join(f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{_fmt(s.get(c))}</td>" for c in cols) + "</tr>"
                   for n, s in report["sources"].items())
    parts_html = ""
    if report["has_parts"]:
        part_names = list(next(iter(report["sources"].values())).get("part_hits", {}))
        head = "".join(f"<th>{esc(p)}</th>" for p in part_names)
        body = "".join(f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{_fmt(s['part_hits'][p])}</td>"
                                                          for p in part_names) + "</tr>"
                       for n, s in report["sources"].items())
        parts_html = f"<h2>Part hit rates</h2><table><tr><th>source</th>{head}</tr>{body}</table>"
    else:
        parts_html = "<p>This data set has no part annotations: box scores only.</p>"
    grids = []
    for g, png in enumerate(report["pngs"]):
        imgs = report["per_image"][g * IMAGES_PER_GRID:(g + 1) * IMAGES_PER_GRID]
        lines = "".join(
            f"<tr><td>{esc(r['id'])}</td><td>{esc(r['true'])}</td><td>{esc(r['pred'])}</td><td>"
            + "; ".join(f"{esc(src)}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sc.items())
                        for src, sc in r["scores"].items() if src not in BASELINES) + "</td></tr>" for r in imgs)
        grids.append(f'<h3>{esc(png)}</h3><a href="{esc(png)}"><img src="{esc(png)}" style="max-width:100%"></a>'
                     f"<table><tr><th>id</th><th>true</th><th>predicted</th><th>scores</th></tr>{lines}</table>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fgvc localization — {esc(report['run'])}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:90%}}</style></head><body>
<h1>Where the model looks: {esc(report['run'])}</h1>
<p>{esc(report['data'])} {esc(report['split'])} split, {len(report['images'])} images, {esc(report['family'])} model.
Pointing-game radius {report['radius_fraction']} × box diagonal; region threshold {report['region_threshold']} × peak.</p>
<table><tr><th>map source</th>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>
{parts_html}
{''.join(grids)}
</body></html>
"""


def compare_table(reports: list[dict], names: list[str]) -> str:
    """One markdown table over several runs' reports: a row per run and map source."""
    cols = [c for c in SCORES if any(c in score_columns(r) for r in reports)]
    lines = ["| run | map source | " + " | ".join(cols) + " | images |",
             "|---|---|" + "---:|" * (len(cols) + 1)]
    for name, r in zip(names, reports):
        for src, s in r["sources"].items():
            lines.append(f"| {name} | {src} | " + " | ".join(_fmt(s.get(c)) for c in cols) + f" | {s['images']} |")
    return "\n".join(lines) + "\n"
