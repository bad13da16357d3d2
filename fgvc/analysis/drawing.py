"""Pictures of where a model looks: one row per image, matplotlib's object-oriented API on Agg.

Row: the image with its visible part keypoints (coloured by part, named in the figure's legend), the
bounding box, RA-CNN's zoom boxes per scale and the DCN's chosen patches; then one panel per map,
overlaid on the image at input resolution, its peak marked (the peak the pointing game scores,
`fgvc.analysis.maps.peaks`). Images are shown with
extent (0, W, H, 0): pixel i covers [i, i + 1), the convention of the boxes and keypoints the data
pipeline returns, so every point lands exactly where the transforms put it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from fgvc.analysis.maps import peaks  # noqa: E402

PANEL_INCHES = 2.2  # side of one panel
MAP_ALPHA = 0.5  # opacity of a map over its image
MAP_CMAP = "jet"
PART_CMAP = "tab20"  # up to 20 parts keep distinct colours (CUB has 15)
ZOOM_COLOURS = ("#ff7f0e", "#d62728", "#9467bd")  # zoom 1, 2, ...
BOX_COLOUR, PATCH_COLOUR, PEAK_COLOUR = "lime", "cyan", "white"
DPI = 100


@dataclass
class ImageView:
    image: np.ndarray  # (H, W, 3) in [0, 1], the network input as the network saw it
    title: str  # e.g. "#12  true: X\npred: Y"
    parts: np.ndarray  # (P, 3) x y visible in input pixels (P may be 0)
    box: np.ndarray  # (4,) x1 y1 x2 y2 in input pixels, nan without a box
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # source -> (H, W) in [0, 1]
    zoom_boxes: list[np.ndarray] = field(default_factory=list)  # per zoom, (4,) x1 y1 x2 y2
    patches: np.ndarray | None = None  # (k, 4) x1 y1 x2 y2 of chosen patches
    scores: dict[str, dict] = field(default_factory=dict)  # source -> {score: value or None}


def to_display(image: Tensor, mean, std) -> np.ndarray:
    """A (3, H, W) network input, normalised or the data pipeline's uint8 -> (H, W, 3) float in [0, 1] for imshow."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().numpy().transpose(1, 2, 0).astype(np.float32) / 255
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.clip(image.detach().cpu().float().numpy() * s + m, 0, 1).transpose(1, 2, 0)


def part_colours(num_parts: int) -> list:
    cmap = plt.get_cmap(PART_CMAP)
    return [cmap(i % cmap.N) for i in range(num_parts)]


def _show(ax, image: np.ndarray) -> None:
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _rect(ax, box, colour: str, style: str = "-", width: float = 1.5) -> None:
    if box is None or not np.all(np.isfinite(box)):
        return
    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linestyle=style, linewidth=width))


def draw_annotations(ax, view: ImageView, colours: list) -> None:
    """Box (dashed lime), zoom boxes per scale, chosen patches (cyan) and visible parts (one
    scatter call, so the points can be read back from ax.collections[0])."""
    _rect(ax, view.box, BOX_COLOUR, "--")
    for s, zb in enumerate(view.zoom_boxes):
        _rect(ax, zb, ZOOM_COLOURS[s % len(ZOOM_COLOURS)])
    if view.patches is not None:
        for p in view.patches:
            _rect(ax, p, PATCH_COLOUR, ":")
    visible = view.parts[:, 2] > 0 if len(view.parts) else np.zeros(0, bool)
    idx = np.flatnonzero(visible)
    ax.scatter(view.parts[idx, 0], view.parts[idx, 1], s=22, c=[colours[i] for i in idx] or "none",
               edgecolors="black", linewidths=0.6, zorder=3)


def draw_map(ax, view: ImageView, name: str, colours: list, radius_fraction: float | None = None) -> None:
    """One panel: the image, the map `name` over it (if the view has it) with its peak marked, the
    annotations; with `radius_fraction` the pointing-game radius around the peak."""
    _show(ax, view.image)
    if name not in view.maps:
        return
    m = view.maps[name]
    h, w = m.shape
    ax.imshow(m, extent=(0, w, h, 0), cmap=MAP_CMAP, alpha=MAP_ALPHA, vmin=0, vmax=1, interpolation="bilinear")
    draw_annotations(ax, view, colours)
    px, py = peaks(torch.as_tensor(m)[None])[0].tolist()  # the scored peak; nan for a constant map: none
    ax.plot([px], [py], marker="+", color=PEAK_COLOUR, markersize=10, markeredgewidth=2)
    diag = np.hypot(view.box[2] - view.box[0], view.box[3] - view.box[1])
    if radius_fraction and np.isfinite(diag) and np.isfinite(px):
        ax.add_patch(Circle((px, py), radius_fraction * diag, fill=False, edgecolor=PEAK_COLOUR, linewidth=0.8))


def draw_panel(view: ImageView, name: str | None = None, inches: float = PANEL_INCHES) -> Figure:
    """A figure of one panel: the annotated image (name None) or the map `name` over it."""
    fig, ax = plt.subplots(figsize=(inches, inches), dpi=DPI)
    if name is None:
        _show(ax, view.image)
        draw_annotations(ax, view, part_colours(len(view.parts)))
    else:
        draw_map(ax, view, name, part_colours(len(view.parts)))
    fig.subplots_adjust(0, 0, 1, 1)
    return fig


def draw_grid(views: list[ImageView], part_names: list[str], radius_fraction: float | None = None) -> Figure:
    """A figure with one row per view: the annotated image, then each map overlaid. With
    `radius_fraction` the pointing-game radius is drawn around each map's peak."""
    names = list(dict.fromkeys(k for v in views for k in v.maps))
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(views), cols, figsize=(PANEL_INCHES * cols, PANEL_INCHES * len(views) + 0.8),
                             squeeze=False, dpi=DPI)
    colours = part_colours(len(part_names))
    for row, view in zip(axes, views):
        _show(row[0], view.image)
        draw_annotations(row[0], view, colours)
        row[0].set_title(view.title, fontsize=8)
        for ax, name in zip(row[1:], names):
            draw_map(ax, view, name, colours, radius_fraction)
            hit = view.scores.get(name, {}).get("pointing")
            mark = "" if hit is None else ("  ✓" if hit >= 1 else "  ✗")
            ax.set_title(f"{name}{mark}", fontsize=8)
    handles = [Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="black", label=p)
               for p, c in zip(part_names, colours)]
    handles.append(Line2D([], [], color=BOX_COLOUR, linestyle="--", label="box"))
    zooms = max((len(v.zoom_boxes) for v in views), default=0)
    handles += [Line2D([], [], color=ZOOM_COLOURS[s % len(ZOOM_COLOURS)], label=f"zoom {s + 1}") for s in range(zooms)]
    if any(v.patches is not None for v in views):
        handles.append(Line2D([], [], color=PATCH_COLOUR, linestyle=":", label="DCN patch"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (PANEL_INCHES * len(views) + 0.8), 1, 1))
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write a PNG and release the figure (pyplot keeps every open figure otherwise)."""
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    plt.close(fig)
