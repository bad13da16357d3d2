"""A synthetic fine-grained bird set written in the real CUB-200-2011 on-disk layout.

Every image shows one cartoon bird (body, head, wing, tail, legs, eye, beak) on a cluttered
background. Body and head colours, size, pose, facing and clutter are random and shared by all
classes; a class is told only by two small parts: the colour of the beak and the colour of a small
patch on the wing. Clutter blobs reuse the cue colours, so colour anywhere in the picture does not
give the class away: a model has to look at the beak and the wing. With `wing_cue="texture"` the
class is told by the wing patch alone: its colour and its texture of one-pixel features, which only
(near) full resolution shows (the beak is then clutter, any beak colour). Keypoints of the 15 CUB parts,
their visibility and the bird's bounding box are written exactly as CUB writes them, so the CUB
reader, the part-localization scores and every tool run on it unchanged.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgvc.data.records import CUB_PARTS
from fgvc.errors import UserError
from fgvc.schema import key, one_of

CLASS_PARTS = ("beak", "left wing", "right wing")  # the parts that carry the class (see class_parts())
JPEG_QUALITY = 92
MANIFEST = "fgvc_synthetic.json"


@dataclass(frozen=True)
class SyntheticSpec:
    """The built-in synthetic fine-grained set (recipe section data.synthetic)."""

    num_classes: int = key(12, "classes: every pair of a beak colour and a wing cue")
    train_per_class: int = key(80, "training images per class")
    test_per_class: int = key(20, "test images per class")
    image_size: int = key(96, "side of the written images, pixels")
    part_scale: float = key(0.06, "size of the discriminative parts (beak, wing patch), fraction of the image side")
    distractors: int = key(6, "clutter blobs on the background, most in the cue colours")
    noise: float = key(0.08, "std of pixel noise (0..1 scale)")
    cue_strength: float = key(1.0, "1 = the class cue is fully visible; lower is harder")
    seed: int = key(0, "the data set's own seed, independent of the training seed")
    hue_offset: float = key(0.0, "turns every cue colour around the colour wheel (0..1): another set of cue colours")
    hidden: float = key(0.0, "share of images in which each class part (beak, wing patch) is not visible: a ceiling on top-1")
    wing_cue: str = one_of("colour", ("colour", "texture"), "what tells the wing's class: its colour, or a texture "
                           "(WING_TEXTURES) of one-pixel features legible only near full resolution")
    texture_px: int = key(1, "side of the texture's features in written pixels (wing_cue=texture): 1 blurs away sooner")
    texture_fine: float = key(0.0, "share of images whose texture has one-pixel features instead of texture_px")
    texture_phase: bool = key(False, "shift each wing's texture by a random offset (its grid not aligned with a 2x shrink)")
    position_spread: float = key(0.0, "0: the bird's centre within 0.35-0.65 of the side; 1: anywhere its body and class "
                                 "parts fit")
    scale_min: float = key(1.0, "the bird and its parts scaled by a factor drawn log-uniformly in [scale_min, 1]")


# With `wing_cue="texture"` the wing patch is a pattern of one-pixel features in two tones (its class
# colour and a dark shade of it), drawn at the written resolution. Every pattern has the
# same mean colour ("flat" is that mean), so when the image is shrunk until single pixels blur the
# patterns look alike: the class is then legible only at (near) full resolution, as a wing bar or a
# streaked breast in CUB is legible at 448 px and not at 112. All are unchanged by a horizontal flip.
WING_TEXTURES = ("flat", "rows", "columns", "checker")
TEXTURE_DARK = 0.3  # the dark tone, as a share of the light one


def wing_texture(kind: int, light: np.ndarray, size: int, px: int = 1, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(size, size, 3) float image of texture `kind` (an index into WING_TEXTURES) in tones light and
    TEXTURE_DARK * light, features of px x px pixels anchored at the image origin shifted by `offset`
    (dy, dx) pixels."""
    y, x = (np.mgrid[0:size, 0:size] + np.asarray(offset).reshape(2, 1, 1)) // px
    name = WING_TEXTURES[kind]
    if name == "flat":
        weight = np.full((size, size), 0.5)
    else:
        weight = {"rows": y % 2, "columns": x % 2, "checker": (x + y) % 2}[name].astype(np.float64)
    tone = TEXTURE_DARK + (1 - TEXTURE_DARK) * weight  # 1 on light pixels, TEXTURE_DARK on dark ones
    return tone[:, :, None] * np.asarray(light, np.float64)[None, None, :]


def class_parts(wing_cue: str = "colour") -> list[str]:
    """Names of the parts whose appearance carries the class; for a bird facing right the wing
    seen is the right one, so both wings count. With the texture cue the wing alone carries it."""
    return [p for p in CLASS_PARTS if wing_cue == "colour" or p != "beak"]


def class_part_keypoints(folder: Path, wing_cue: str = "colour", split: str = "test") -> np.ndarray:
    """(N, P, 3) x, y, visible of the class parts (class_parts(wing_cue)) of every image of a written
    set's `split` ("train" or "test"), in written pixels, read from its CUB part files."""
    folder = Path(folder)
    names = [line.split(" ", 1)[1] for line in (folder / "parts" / "parts.txt").read_text().splitlines()]
    cols = [names.index(p) for p in class_parts(wing_cue)]
    is_train = {int(i): int(t) for i, t in (line.split() for line in (folder / "train_test_split.txt").read_text().splitlines())}
    locs = np.loadtxt(folder / "parts" / "part_locs.txt", ndmin=2)  # image id, part id (1-based), x, y, visible
    ids = sorted(i for i, t in is_train.items() if t == (split == "train"))
    table = locs.reshape(-1, len(names), 5)  # written image by image, parts in order
    keep = np.isin(table[:, 0, 0].astype(int), ids)
    return table[keep][:, cols, 2:5]


def centred_box_coverage(parts: np.ndarray, side: float, box_side: float) -> float:
    """Share of images whose visible class parts all lie in the box of side `box_side` centred in the
    `side` x `side` image (a zoom that does not move); images with no visible class part are not
    counted. parts: (N, P, 3) x, y, visible, as class_part_keypoints returns."""
    visible = parts[..., 2] > 0  # (N, P)
    half, centre = box_side / 2, side / 2
    inside = (np.abs(parts[..., 0] - centre) <= half) & (np.abs(parts[..., 1] - centre) <= half)
    counted = visible.any(axis=1)
    held = (inside | ~visible).all(axis=1) & counted
    return float(held.sum() / max(counted.sum(), 1))


def _cue_palette(n: int, offset: float) -> list[tuple[float, float, float]]:
    """n hues evenly spread on the colour wheel (RGB 0..1), at full saturation."""
    return [colorsys.hsv_to_rgb((offset + i / n) % 1.0, 0.85, 0.95) for i in range(n)]


def class_codes(num_classes: int) -> tuple[list[tuple[int, int]], int, int]:
    """Class c -> (beak colour index, wing colour index): a grid as close to square as possible,
    so both parts are needed to tell every class apart."""
    n_beak = int(np.ceil(np.sqrt(num_classes)))
    n_wing = int(np.ceil(num_classes / n_beak))
    return [(c % n_beak, c // n_beak) for c in range(num_classes)], n_beak, n_wing


def _rgb(c: np.ndarray | tuple) -> tuple[int, int, int]:
    return tuple(int(round(255 * float(np.clip(v, 0, 1)))) for v in c)  # type: ignore[return-value]


def _draw_bird(rng: np.random.Generator, spec: SyntheticSpec, beak_rgb, wing_rgb, cue_colours,
               wing_kind: int = 0):
    """One image (H, W, 3) uint8, its box (x, y, w, h) and 15 CUB parts (x, y, visible). With
    `spec.wing_cue == "texture"` the wing patch is texture `wing_kind` in the colour `wing_rgb`."""
    s = spec.image_size
    # each class part is hidden in a share `hidden` of the images (beak turned away, wing patch
    # folded under), as CUB records parts that cannot be seen: no model can tell its colour there,
    # so top-1 has a ceiling below 100%. No draw when 0: sets made before the option are unchanged.
    hide_beak = spec.hidden > 0 and rng.random() < spec.hidden
    hide_wing = spec.hidden > 0 and rng.random() < spec.hidden
    # some wings carry their texture at one pixel, which a shrunk picture loses: detail at several
    # scales, as in real photos. No draw when 0: sets made before the option are unchanged.
    fine = spec.texture_fine > 0 and rng.random() < spec.texture_fine
    # background: a smooth random gradient plus clutter blobs in cue and random colours
    top, bottom = rng.uniform(0.2, 0.9, 3), rng.uniform(0.2, 0.9, 3)
    ramp = np.linspace(0, 1, s)[:, None, None]
    bg = (top * (1 - ramp) + bottom * ramp) * np.ones((s, s, 3))
    img = Image.fromarray((bg * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(spec.distractors):
        r = rng.uniform(0.03, 0.08) * s
        x, y = rng.uniform(0, s, 2)
        colour = cue_colours[rng.integers(len(cue_colours))] if rng.random() < 0.7 else rng.uniform(0, 1, 3)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_rgb(colour))

    face = 1 if rng.random() < 0.5 else -1  # +1 faces right
    # the bird's scale: no draw at 1, so sets made before the option are unchanged
    k = float(np.exp(rng.uniform(np.log(spec.scale_min), 0.0))) if spec.scale_min < 1 else 1.0
    a = rng.uniform(0.18, 0.26) * s * k  # body half-width
    b = a * rng.uniform(0.55, 0.7)  # body half-height
    hr = 0.5 * b  # head radius
    beak_len = max(2.0, spec.part_scale * s * 1.4 * k)
    beak_half = max(1.5, spec.part_scale * s * 0.55 * k)
    if spec.position_spread > 0:
        cx, cy = _bird_centre(rng, s, spec.position_spread, face, a, b, hr, beak_len, beak_half)
    else:  # the default band, drawn as sets made before the option drew it
        cx = rng.uniform(0.35, 0.65) * s
        cy = rng.uniform(0.45, 0.62) * s
    body_rgb = _rgb(rng.uniform(0.25, 0.75, 3))
    head_rgb = _rgb(rng.uniform(0.25, 0.75, 3))
    hx, hy = cx + face * 0.95 * a, cy - 0.85 * b
    tail_x = cx - face * 1.5 * a
    leg_top, leg_bot = cy + 0.9 * b, cy + 1.7 * b

    # tail, legs, body, wing, wing patch (class), head, eye, beak (class)
    draw.polygon([(cx - face * 0.8 * a, cy - 0.25 * b), (tail_x, cy - 0.7 * b), (tail_x, cy + 0.1 * b)],
                 fill=body_rgb)
    for dx in (-0.25 * a, 0.2 * a):
        draw.line([(cx + dx, leg_top), (cx + dx, leg_bot)], fill=(60, 40, 20), width=max(1, s // 64))
    draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=body_rgb)
    wx, wy = cx - face * 0.15 * a, cy - 0.05 * b
    draw.ellipse([wx - 0.55 * a, wy - 0.45 * b, wx + 0.55 * a, wy + 0.45 * b],
                 fill=_rgb(np.array(body_rgb) / 255 * 0.7))
    pr = max(1.5, spec.part_scale * s * 0.6 * k)
    if not hide_wing and spec.wing_cue == "texture":
        mask = Image.new("L", (s, s))
        ImageDraw.Draw(mask).ellipse([wx - pr, wy - pr, wx + pr, wy + pr], fill=255)
        px = 1 if fine else spec.texture_px
        # a random phase: no draw without the option, so sets made before it are unchanged
        offset = tuple(int(v) for v in rng.integers(0, 2 * px, 2)) if spec.texture_phase else (0, 0)
        pattern = wing_texture(wing_kind, wing_rgb, s, px, offset)
        pattern = (np.clip(pattern, 0, 1) * 255).round().astype(np.uint8)
        img.paste(Image.fromarray(pattern), mask=mask)  # `draw` keeps drawing on img
    elif not hide_wing:
        draw.ellipse([wx - pr, wy - pr, wx + pr, wy + pr], fill=_rgb(wing_rgb))
    draw.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=head_rgb)
    ex, ey = hx + face * 0.35 * hr, hy - 0.2 * hr
    er = max(1.0, 0.16 * hr)
    draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(10, 10, 10))
    bx0 = hx + face * 0.85 * hr
    tip = (bx0 + face * beak_len, hy)
    if not hide_beak:
        draw.polygon([(bx0, hy - beak_half), tip, (bx0, hy + beak_half)], fill=_rgb(beak_rgb))

    arr = np.asarray(img).astype(np.float32) / 255
    arr = np.clip(arr + rng.normal(0, spec.noise, arr.shape), 0, 1)
    image = (arr * 255).round().astype(np.uint8)

    near_eye, far_eye = ("right eye", "left eye") if face > 0 else ("left eye", "right eye")
    near_wing, far_wing = ("right wing", "left wing") if face > 0 else ("left wing", "right wing")
    near_leg, far_leg = ("right leg", "left leg") if face > 0 else ("left leg", "right leg")
    pts = {
        "back": (cx - face * 0.2 * a, cy - 0.95 * b, 1), "beak": (bx0 + face * 0.5 * beak_len, hy, int(not hide_beak)),
        "belly": (cx, cy + 0.7 * b, 1), "breast": (cx + face * 0.6 * a, cy + 0.3 * b, 1),
        "crown": (hx, hy - 0.9 * hr, 1), "forehead": (hx + face * 0.6 * hr, hy - 0.65 * hr, 1),
        near_eye: (ex, ey, 1), far_eye: (0, 0, 0), near_leg: (cx + 0.2 * a, leg_bot, 1),
        far_leg: (cx - 0.25 * a, leg_bot, 1), near_wing: (wx, wy, int(not hide_wing)), far_wing: (0, 0, 0),
        "nape": (hx - face * 0.7 * hr, hy + 0.3 * hr, 1), "tail": (tail_x, cy - 0.3 * b, 1),
        "throat": (hx + face * 0.3 * hr, hy + 0.85 * hr, 1),
    }
    parts = np.array([pts[name] for name in CUB_PARTS], dtype=np.float64)
    # the patch is on the near wing, so the class cue "wing" is whichever wing is visible
    x0 = min(tail_x, cx - a, tip[0], hx - hr)
    x1 = max(tail_x, cx + a, tip[0], hx + hr)
    y0, y1 = min(cy - b, hy - hr, cy - 0.7 * b), leg_bot
    x0, y0 = max(0.0, x0), max(0.0, y0)
    x1, y1 = min(s - 1.0, x1), min(s - 1.0, y1)
    parts[:, :2] = np.clip(parts[:, :2], 0, s - 1) * parts[:, 2:3]
    return image, (x0, y0, x1 - x0, y1 - y0), parts


def bird_extent(face: int, a: float, b: float, hr: float, beak_len: float, beak_half: float) -> tuple[float, ...]:
    """How far the body, head and class parts (beak tip, wing patch) reach from the bird's centre:
    (left, right, up, down) in pixels, for a bird facing `face` (+1 right) with body half-axes a, b,
    head radius hr and beak length beak_len. Legs and tail are not counted: they may leave the image,
    as in a cropped photo."""
    beak = 0.95 * a + 0.85 * hr + beak_len  # the beak's tip, from the centre along the facing
    left, right = (a, beak) if face > 0 else (beak, a)
    up = max(0.85 * b + hr, 0.85 * b + beak_half)  # the head's top, the beak's upper edge
    return left, right, up, b


def _bird_centre(rng: np.random.Generator, s: int, spread: float, face: int, a: float, b: float, hr: float,
                 beak_len: float, beak_half: float) -> tuple[float, float]:
    """The bird's centre, uniform in a band that goes from the default one (x in 0.35-0.65 and y in
    0.45-0.62 of the side, spread 0) to every centre at which the body, head and class parts lie in
    the image (spread 1), linearly in `spread`."""
    left, right, up, down = bird_extent(face, a, b, hr, beak_len, beak_half)
    lo_x, hi_x = (1 - spread) * 0.35 * s + spread * left, (1 - spread) * 0.65 * s + spread * (s - 1 - right)
    lo_y, hi_y = (1 - spread) * 0.45 * s + spread * up, (1 - spread) * 0.62 * s + spread * (s - 1 - down)
    return rng.uniform(lo_x, max(lo_x, hi_x)), rng.uniform(lo_y, max(lo_y, hi_y))


def _mix(cue: tuple, rng: np.random.Generator, strength: float) -> np.ndarray:
    """The class colour, blended toward a random colour when cue_strength < 1."""
    return strength * np.asarray(cue) + (1 - strength) * rng.uniform(0, 1, 3)


def write_synthetic(folder: Path, spec: SyntheticSpec) -> None:
    """Write the whole set in the CUB layout into `folder` (which must not exist)."""
    rng = np.random.default_rng(spec.seed)
    codes, n_beak, n_wing = class_codes(spec.num_classes)
    texture = spec.wing_cue == "texture"
    beak_palette = _cue_palette(n_beak, spec.hue_offset)
    wing_palette = _cue_palette(n_wing, spec.hue_offset + 0.5 / max(n_wing, 1))
    cue_colours = beak_palette + wing_palette  # the clutter's colours
    if texture:  # the grid's first index is then the wing patch's colour, the second its texture
        wing_palette = _cue_palette(n_beak, spec.hue_offset + 0.5 / max(n_beak, 1))
    (folder / "images").mkdir(parents=True)
    (folder / "parts").mkdir()
    classes, images, labels, split, boxes, locs = [], [], [], [], [], []
    image_id = 0
    for c, (bi, wi) in enumerate(codes):
        cname = f"{c + 1:03d}.Synth_bird_" + (f"c{bi}_t{wi}" if texture else f"b{bi}_w{wi}")
        classes.append(f"{c + 1} {cname}")
        (folder / "images" / cname).mkdir()
        for j in range(spec.train_per_class + spec.test_per_class):
            image_id += 1
            # drawn in both modes, though the texture mode replaces it: the draws' order fixes every image
            beak_rgb = _mix(beak_palette[bi], rng, spec.cue_strength)
            if texture:  # wing colour bi and texture wi at full strength; the beak is clutter: any beak colour
                beak_rgb = np.asarray(beak_palette[rng.integers(n_beak)])
                wing_rgb = np.asarray(wing_palette[bi])
            else:
                wing_rgb = _mix(wing_palette[wi], rng, spec.cue_strength)
            img, box, parts = _draw_bird(rng, spec, beak_rgb, wing_rgb, cue_colours, wi)
            rel = f"{cname}/{cname}_{j:04d}.jpg"
            Image.fromarray(img).save(folder / "images" / rel, quality=JPEG_QUALITY)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(j < spec.train_per_class)}")
            boxes.append(f"{image_id} " + " ".join(f"{v:.1f}" for v in box))
            for p, (x, y, vis) in enumerate(parts, 1):
                locs.append(f"{image_id} {p} {x:.1f} {y:.1f} {int(vis)}")

    def write(name: str, lines: list[str]) -> None:
        (folder / name).write_text("\n".join(lines) + "\n")

    write("classes.txt", classes)
    write("images.txt", images)
    write("image_class_labels.txt", labels)
    write("train_test_split.txt", split)
    write("bounding_boxes.txt", boxes)
    write("parts/parts.txt", [f"{i} {n}" for i, n in enumerate(CUB_PARTS, 1)])
    write("parts/part_locs.txt", locs)
    write(MANIFEST, [json.dumps(_named_fields(spec, later=LATER[1:]), sort_keys=True)])


# settings added after the first sets
LATER = ("hue_offset", "hidden", "wing_cue", "texture_px", "texture_fine", "position_spread", "scale_min",
         "texture_phase")


def _named_fields(spec: SyntheticSpec, later: tuple[str, ...] = LATER) -> dict:
    """The settings that name a set: those added `later` count only away from their default, so a
    set made before they existed keeps its folder name (all of LATER) and manifest (all but
    hue_offset, which the first manifests wrote)."""
    defaults = asdict(SyntheticSpec())
    return {k: v for k, v in asdict(spec).items() if not (k in later and v == defaults[k])}


def synthetic_folder(root: Path, spec: SyntheticSpec) -> Path:
    """Where the set for `spec` lives: one sub-folder per setting, so sets never overwrite each other.
    A setting at its default that older sets did not have (hue_offset, hidden) leaves the name unchanged."""
    digest = hashlib.sha1(json.dumps(_named_fields(spec), sort_keys=True).encode()).hexdigest()[:10]
    return Path(root) / f"synth-{spec.num_classes}c-{spec.image_size}px-{digest}"


def ensure_synthetic(root: Path, spec: SyntheticSpec) -> Path:
    """The CUB-layout folder of the set, generated on first use (atomically: a half-written set is
    never taken for a whole one). Call it from one process at a time."""
    if spec.num_classes < 2 or spec.train_per_class < 2 or spec.test_per_class < 1:
        raise UserError("data.synthetic needs num_classes >= 2, train_per_class >= 2 and test_per_class >= 1.")
    if not 0 <= spec.position_spread <= 1 or not 0 < spec.scale_min <= 1:
        raise UserError(f"data.synthetic.position_spread is {spec.position_spread} and scale_min {spec.scale_min}, "
                        "but they must lie in [0, 1] and (0, 1].")
    if spec.texture_px < 1:
        raise UserError(f"data.synthetic.texture_px is {spec.texture_px} but must be at least 1 (pixels).")
    if spec.wing_cue == "texture" and class_codes(spec.num_classes)[2] > len(WING_TEXTURES):
        raise UserError(f"data.synthetic.wing_cue=texture tells at most {len(WING_TEXTURES)} wing classes apart, "
                        f"which allows up to {len(WING_TEXTURES) ** 2} classes; set data.synthetic.num_classes "
                        f"to {len(WING_TEXTURES) ** 2} or fewer.")
    folder = synthetic_folder(root, spec)
    if (folder / MANIFEST).is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_synthetic(tmp, spec)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
