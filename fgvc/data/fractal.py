"""A formula-driven pretraining set: one class per random iterated function system (IFS).

In the spirit of FractalDB (Kataoka et al., "Pre-training without Natural Images", ACCV 2020 /
IJCV 2022) and of Anderson and Farrell ("Improving Fractal Pre-training", WACV 2022): a class is
the attractor of an IFS, a small set of contractive affine maps w_j(x) = A_j x + b_j drawn at
random; its images are rendered by the chaos game (a point repeatedly moved by a map chosen with
probability proportional to |det A_j|). Nothing is downloaded or written to disk: every image is
rendered when it is read, from (data seed, class, image index) alone, so the set is the same on
every machine and any size costs no storage. It is meant as the generic task a backbone learns
before a fine-grained one (the analogue of ImageNet before CUB), for users who cannot use
ImageNet weights (licence, no internet).

fgvc's own construction (not FractalDB's parameter search):
- each map is A = R(theta) diag(s1, s2) R(phi) with singular values s in [SIGMA_MIN, SIGMA_MAX]
  (contractive, so the attractor exists; the parameterisation by singular values follows the
  observation of Anderson and Farrell that it controls how well the attractor is filled), a
  reflection with probability 1/2, and a translation in [-1, 1]^2;
- a system is kept only when its attractor fills at least `min_fill` of a 64 x 64 grid
  (FractalDB's "filling rate" test, which rejects systems collapsing to a line or a few dots);
- an image of class c perturbs every map parameter slightly (`jitter`, so images of one class are
  alike but not identical, FractalDB's intra-class variation), places the attractor with a random
  rotation, scale, position and mirror, and colours each point by the map that moved it last
  (random colours per image: the class is the shape, never the colour) on a random dark or light
  smooth background.
"""

from __future__ import annotations

import colorsys
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fgvc.data.records import DatasetIndex, Sample
from fgvc.errors import UserError
from fgvc.schema import key

SIGMA_MIN, SIGMA_MAX = 0.25, 0.9  # singular values of each map: contractive, neither a dot nor a blur
MAX_DRAWS = 500  # systems tried per class before giving up (a few suffice; the limit is a safeguard)
FILL_GRID = 64  # side of the grid the filling rate is measured on
FILL_POINTS = 4000  # chaos-game points of the filling-rate test
CHAINS = 256  # chaos games run side by side (vectorised); each discards its first BURN_IN points
BURN_IN = 12  # steps after which a chain is on the attractor to within 0.9^12 of its extent


@dataclass(frozen=True)
class FractalSpec:
    """The formula-driven pretraining set, rendered when read (recipe section data.fractal)."""

    num_classes: int = key(100, "classes: one random iterated function system each")
    train_per_class: int = key(60, "training images per class")
    test_per_class: int = key(10, "test images per class")
    image_size: int = key(96, "side of the rendered images, pixels")
    points: int = key(12000, "chaos-game points per image")
    min_maps: int = key(2, "affine maps per system, at least")
    max_maps: int = key(4, "affine maps per system, at most")
    min_fill: float = key(0.08, "least share of a 64 x 64 grid a class's attractor must cover")
    jitter: float = key(0.04, "std of the per-image perturbation of every map parameter (intra-class variation)")
    seed: int = key(0, "the data set's own seed: which systems the classes get")
    class_colours: float = key(0.0, "share of images in their class's own map colours (0: random colours, FractalDB)")


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _draw_system(rng: np.random.Generator, spec: FractalSpec) -> tuple[np.ndarray, np.ndarray]:
    """A random IFS: maps (n, 2, 2) and translations (n, 2)."""
    n = int(rng.integers(spec.min_maps, spec.max_maps + 1))
    maps = np.empty((n, 2, 2))
    for j in range(n):
        sigma = np.diag(rng.uniform(SIGMA_MIN, SIGMA_MAX, 2) * [1.0, rng.choice([-1.0, 1.0])])
        maps[j] = _rotation(rng.uniform(0, 2 * np.pi)) @ sigma @ _rotation(rng.uniform(0, 2 * np.pi))
    return maps, rng.uniform(-1, 1, (n, 2))


def map_probabilities(maps: np.ndarray) -> np.ndarray:
    """p_j proportional to |det A_j| (the area each map covers), floored so no map is never chosen."""
    area = np.abs(np.linalg.det(maps)) + 0.05
    return area / area.sum()


def chaos_game(maps: np.ndarray, shifts: np.ndarray, points: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(points, 2) points on the attractor and (points,) index of the map that placed each one."""
    steps = BURN_IN + -(-points // CHAINS)
    choice = rng.choice(len(maps), size=(steps, CHAINS), p=map_probabilities(maps))
    x = rng.uniform(-1, 1, (CHAINS, 2))
    xs, js = [], []
    for t in range(steps):
        j = choice[t]
        x = np.einsum("kab,kb->ka", maps[j], x) + shifts[j]  # x <- A_j x + b_j for every chain
        if t >= BURN_IN:
            xs.append(x)
            js.append(j)
    return np.concatenate(xs)[:points], np.concatenate(js)[:points]


def filling_rate(pts: np.ndarray, grid: int = FILL_GRID) -> float:
    """Share of a grid x grid raster covered by the points, scaled to fit it (FractalDB's test)."""
    lo, hi = pts.min(0), pts.max(0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent < 1e-6:
        return 0.0
    cells = np.clip(((pts - lo) / extent * (grid - 1)).round().astype(int), 0, grid - 1)
    return len(np.unique(cells[:, 0] * grid + cells[:, 1])) / grid**2


@functools.lru_cache(maxsize=8)
def class_systems(spec: FractalSpec) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """The IFS of every class: drawn from (seed, class), kept when it fills enough of the grid."""
    systems = []
    for c in range(spec.num_classes):
        rng = np.random.default_rng([spec.seed, c])
        for _ in range(MAX_DRAWS):
            maps, shifts = _draw_system(rng, spec)
            pts, _ = chaos_game(maps, shifts, FILL_POINTS, rng)
            if filling_rate(pts) >= spec.min_fill:
                break
        else:
            raise UserError(f"no fractal system for class {c} fills {spec.min_fill} of the grid after {MAX_DRAWS} "
                            "draws; lower data.fractal.min_fill.")
        systems.append((maps, shifts))
    return tuple(systems)


HUE_JITTER = 0.02  # per-image turn of a class's hues (fraction of the colour wheel)


def _class_colours(spec: FractalSpec, label: int, n: int, dark: bool, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) RGB: the class's own saturated hue for each map (drawn from (seed, class) alone), turned
    slightly per image, bright on a dark background and deep on a light one. With these the class is
    its shape AND its colours, so pretraining keeps features that tell hues apart, which random
    colours teach a network to ignore (fgvc's addition to FractalDB's rendering; data.fractal.class_colours)."""
    hues = np.random.default_rng([spec.seed, label, 2]).uniform(0, 1, n)
    turn = rng.normal(0, HUE_JITTER)
    value = rng.uniform(0.8, 1.0) if dark else rng.uniform(0.3, 0.5)
    return np.array([colorsys.hsv_to_rgb((h + turn) % 1.0, rng.uniform(0.7, 1.0), value) for h in hues])


def render(spec: FractalSpec, label: int, index: int) -> np.ndarray:
    """Image `index` of class `label`: (S, S, 3) uint8, the same on every call and machine."""
    maps, shifts = class_systems(spec)[label]
    rng = np.random.default_rng([spec.seed, label, index, 1])
    maps = maps + rng.normal(0, spec.jitter, maps.shape)
    shifts = shifts + rng.normal(0, spec.jitter, shifts.shape)
    pts, which = chaos_game(maps, shifts, spec.points, rng)
    # place: centre on the robust extent, random rotation, mirror, scale and position
    lo, hi = np.percentile(pts, [1, 99], axis=0)
    pts = (pts - (lo + hi) / 2) / max(float((hi - lo).max()), 1e-6)  # about [-0.5, 0.5]
    pts = pts @ _rotation(rng.uniform(0, 2 * np.pi)).T * [rng.choice([-1.0, 1.0]), 1.0]
    s = spec.image_size
    scale = rng.uniform(0.55, 0.9) * s
    centre = s / 2 + rng.uniform(-0.15, 0.15, 2) * s
    pix = (pts * scale + centre).round().astype(int)
    keep = ((pix >= 0) & (pix < s)).all(1)
    # background: a smooth gradient between two random colours, dark or light
    dark = rng.random() < 0.5
    base = rng.uniform(0.0, 0.3, (2, 3)) if dark else rng.uniform(0.7, 1.0, (2, 3))
    ramp = np.linspace(0, 1, s)[:, None, None]
    image = (base[0] * (1 - ramp) + base[1] * ramp) * np.ones((s, s, 3))  # (S, S, 3)
    colours = rng.uniform(0.5, 1.0, (len(maps), 3)) if dark else rng.uniform(0.0, 0.5, (len(maps), 3))
    if spec.class_colours > 0 and rng.random() < spec.class_colours:
        colours = _class_colours(spec, label, len(maps), dark, rng)
    ink = np.zeros((s, s, 3))
    hits = np.zeros((s, s))
    np.add.at(ink, (pix[keep, 1], pix[keep, 0]), colours[which[keep]])
    np.add.at(hits, (pix[keep, 1], pix[keep, 0]), 1.0)
    covered = hits > 0
    image[covered] = ink[covered] / hits[covered][:, None]
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def fractal_index(spec: FractalSpec) -> DatasetIndex:
    """The set as samples whose images are rendered when read (no files)."""
    if spec.num_classes < 2 or spec.train_per_class < 2 or spec.test_per_class < 1:
        raise UserError("data.fractal needs num_classes >= 2, train_per_class >= 2 and test_per_class >= 1.")
    if not 1 <= spec.min_maps <= spec.max_maps:
        raise UserError("data.fractal needs 1 <= min_maps <= max_maps.")
    names = [f"fractal_{c:04d}" for c in range(spec.num_classes)]
    train, test = [], []
    for c, name in enumerate(names):
        for i in range(spec.train_per_class + spec.test_per_class):
            split = train if i < spec.train_per_class else test
            split.append(Sample(path=Path(f"fractal/{name}/{i:05d}"), label=c, image_id=f"{name}/{i:05d}",
                                render=functools.partial(render, spec, c, i)))
    return DatasetIndex(name="fractal", root=Path("fractal"), class_names=names, train=train, test=test)
