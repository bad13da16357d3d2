"""The built-in synthetic set: CUB layout, determinism, and cues where the parts say."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fgvc.data.records import CUB_PARTS, DATASETS
from fgvc.data.synthetic import (WING_TEXTURES, SyntheticSpec, centred_box_coverage, class_codes, class_part_keypoints,
                                 class_parts, ensure_synthetic, synthetic_folder, wing_texture, write_synthetic)
from fgvc.errors import UserError
import fgvc.data.cub  # noqa: F401  (registers the reader)

SPEC = SyntheticSpec(num_classes=4, train_per_class=3, test_per_class=2, image_size=48)


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_spec_writes_identical_bytes(tmp_path):
    write_synthetic(tmp_path / "a", SPEC)
    write_synthetic(tmp_path / "b", SPEC)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_other_seed_writes_other_images(tmp_path):
    write_synthetic(tmp_path / "a", SPEC)
    write_synthetic(tmp_path / "b", SyntheticSpec(**{**SPEC.__dict__, "seed": 1}))
    assert digest(tmp_path / "a") != digest(tmp_path / "b")


def test_read_by_the_cub_reader_with_counts_and_parts(tmp_path):
    folder = ensure_synthetic(tmp_path, SPEC)
    index = DATASETS.get("cub")(folder)
    assert index.num_classes == 4
    assert len(index.train) == 4 * 3 and len(index.test) == 4 * 2
    assert index.part_names == CUB_PARTS
    for s in index.train + index.test:
        assert s.parts.shape == (15, 3) and s.box.shape == (4,)
        vis = s.parts[:, 2] > 0
        assert vis.sum() == 13  # a side view: the far eye and the far wing are hidden
        assert np.all(s.parts[~vis, :2] == 0)  # CUB writes invisible parts as 0 0 0
        x, y, w, h = s.box
        inside = vis & (s.parts[:, 0] >= x - 1) & (s.parts[:, 0] <= x + w + 1)
        assert inside.sum() == vis.sum()  # every visible part lies in the bird's box


def test_different_settings_live_in_different_folders(tmp_path):
    a = ensure_synthetic(tmp_path, SPEC)
    b = ensure_synthetic(tmp_path, SyntheticSpec(**{**SPEC.__dict__, "noise": 0.2}))
    assert a != b and a.is_dir() and b.is_dir()
    assert ensure_synthetic(tmp_path, SPEC) == a  # made once, then reused


def test_every_class_has_its_own_pair_of_part_colours():
    codes, n_beak, n_wing = class_codes(12)
    assert len(set(codes)) == 12 and n_beak * n_wing >= 12
    # each beak colour is shared by several classes: the beak alone does not tell the class
    assert len({c[0] for c in codes}) < 12 and len({c[1] for c in codes}) < 12


def test_hidden_parts_are_not_drawn_and_are_recorded_invisible(tmp_path):
    """data.synthetic.hidden: a class part that cannot be seen is neither drawn nor marked visible
    (CUB's visibility flag), so no model can read the class from it; 0 changes nothing."""
    beak, wings = CUB_PARTS.index("beak"), [CUB_PARTS.index("left wing"), CUB_PARTS.index("right wing")]
    shown = DATASETS.get("cub")(ensure_synthetic(tmp_path, SPEC))
    hidden = DATASETS.get("cub")(ensure_synthetic(tmp_path, SyntheticSpec(**{**SPEC.__dict__, "hidden": 1.0})))
    for s in hidden.train + hidden.test:
        assert s.parts[beak, 2] == 0 and s.parts[wings, 2].sum() == 0 and (s.parts[:, 2] > 0).sum() == 11
    assert all(s.parts[beak, 2] == 1 and s.parts[wings, 2].sum() == 1 for s in shown.train + shown.test)
    some = DATASETS.get("cub")(ensure_synthetic(tmp_path, SyntheticSpec(**{**SPEC.__dict__, "hidden": 0.5,
                                                                             "train_per_class": 20})))
    seen = [s.parts[beak, 2] for s in some.train]
    assert 0.25 < 1 - np.mean(seen) < 0.75  # about half the beaks hidden


def test_wing_textures_share_their_mean_colour_and_differ_only_in_one_pixel_detail():
    """data.synthetic.wing_cue=texture: every texture has the same mean colour (so a picture shrunk
    until single pixels blur loses the class) and differs from the others pixel by pixel."""
    light = np.array([0.9, 0.2, 0.4])
    kinds = [wing_texture(k, light, 8) for k in range(len(WING_TEXTURES))]
    for t in kinds:
        np.testing.assert_allclose(t.reshape(-1, 3).mean(0), kinds[0].reshape(-1, 3).mean(0))
        # the mean of every 2x2 block is the flat colour: two pixels of blur remove the class
        blocks = t.reshape(4, 2, 4, 2, 3).mean((1, 3))
        np.testing.assert_allclose(blocks, kinds[0][:4, :4])
    assert len({t.tobytes() for t in kinds}) == len(WING_TEXTURES)
    rows = kinds[WING_TEXTURES.index("rows")]
    assert np.all(rows[0] == rows[0, 0]) and not np.allclose(rows[0], rows[1])  # constant along a row
    coarse = wing_texture(WING_TEXTURES.index("rows"), light, 8, px=2)  # texture_px=2: rows two pixels high
    np.testing.assert_allclose(coarse[0], coarse[1])
    np.testing.assert_allclose(coarse[0], rows[0])
    assert not np.allclose(coarse[1], coarse[2])


def test_texture_wing_cue_writes_another_set_and_keeps_the_colour_sets(tmp_path):
    colour = ensure_synthetic(tmp_path, SPEC)
    texture = ensure_synthetic(tmp_path, SyntheticSpec(**{**SPEC.__dict__, "wing_cue": "texture"}))
    assert colour != texture and digest(colour) != digest(texture)
    assert "wing_cue" not in (colour / "fgvc_synthetic.json").read_text()  # sets made before the option keep their manifest
    assert '"wing_cue": "texture"' in (texture / "fgvc_synthetic.json").read_text()
    index = DATASETS.get("cub")(texture)
    assert index.num_classes == 4 and len(index.train) == 12
    # the class is the wing patch's colour and texture; the beak is clutter
    assert sorted(p.name.split("bird_")[1] for p in (texture / "images").iterdir()) == ["c0_t0", "c0_t1", "c1_t0", "c1_t1"]
    assert class_parts("texture") == ["left wing", "right wing"] and "beak" in class_parts()


def test_texture_wing_cue_refuses_more_classes_than_textures_can_tell(tmp_path):
    with pytest.raises(UserError, match="num_classes"):
        ensure_synthetic(tmp_path, SyntheticSpec(**{**SPEC.__dict__, "num_classes": 25, "wing_cue": "texture"}))


def test_texture_fine_draws_a_share_of_wings_at_one_pixel(tmp_path):
    """data.synthetic.texture_fine: that share of the wings carry one-pixel features, the rest
    texture_px; a set without it keeps its folder (and images) unchanged."""
    base = SyntheticSpec(**{**SPEC.__dict__, "wing_cue": "texture", "texture_px": 2})
    assert ensure_synthetic(tmp_path, base) == ensure_synthetic(tmp_path, SyntheticSpec(**{**base.__dict__,
                                                                                          "texture_fine": 0.0}))
    mixed = ensure_synthetic(tmp_path, SyntheticSpec(**{**base.__dict__, "texture_fine": 0.5}))
    assert mixed != ensure_synthetic(tmp_path, base)
    assert '"texture_fine": 0.5' in (mixed / "fgvc_synthetic.json").read_text()


# sha256 of every file of a small set with the colour regime's and the texture candidate's settings, as
# written by the generator before the position and scale options existed (recorded then): the options
# at their defaults must leave both sets, and their folder names, unchanged byte for byte.
SMALL = dict(num_classes=16, train_per_class=2, test_per_class=1, image_size=192, part_scale=0.04, hidden=0.12)
BEFORE = {
    "colour": (SyntheticSpec(**SMALL), "e1ada6e0b2af24d7f68afcde37bf93cd1afc4d89aa094575875b118a934e3560",
               "synth-16c-192px-05be90f025"),
    "texture": (SyntheticSpec(**SMALL, wing_cue="texture", texture_px=2, texture_fine=0.25),
                "6c9033f0d2bef82ced5c6c20c03649280ac2246699a7830fc02ce9ab60b77df0", "synth-16c-192px-7e3dd4403d"),
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_position_and_scale_options_at_their_defaults_keep_the_sets_byte_for_byte(tmp_path, name):
    spec, sha, folder = BEFORE[name]
    write_synthetic(tmp_path / name, spec)
    assert digest(tmp_path / name) == sha
    assert synthetic_folder(tmp_path, spec).name == folder
    assert "position_spread" not in (tmp_path / name / "fgvc_synthetic.json").read_text()


SPREAD = dict(num_classes=4, train_per_class=10, test_per_class=10, image_size=96, part_scale=0.04)


def test_position_spread_and_scale_vary_the_bird_and_keep_its_class_parts_inside(tmp_path):
    """Wider spread of centres and smaller birds than the default band; every class part (and the
    bird's box) inside the image, visible wherever it is drawn."""
    fixed = ensure_synthetic(tmp_path, SyntheticSpec(**SPREAD))
    moved = ensure_synthetic(tmp_path, SyntheticSpec(**SPREAD, position_spread=1.0, scale_min=0.5))
    assert fixed != moved

    def boxes(folder):
        return np.array([[float(v) for v in line.split()[1:]]
                         for line in (folder / "bounding_boxes.txt").read_text().splitlines()])

    b0, b1 = boxes(fixed), boxes(moved)
    centre0, centre1 = b0[:, :2] + b0[:, 2:] / 2, b1[:, :2] + b1[:, 2:] / 2
    assert centre1[:, 0].std() > 1.5 * centre0[:, 0].std() and centre1[:, 1].std() > 1.5 * centre0[:, 1].std()
    assert b1[:, 2].min() < 0.75 * b0[:, 2].min()  # smaller birds
    for split in ("train", "test"):
        parts = class_part_keypoints(moved, "colour", split)
        assert parts.shape == (40, 3, 3)
        seen = parts[..., 2] > 0
        assert seen.sum(axis=1).min() == 2  # the beak and the near wing, none hidden (hidden=0)
        xy = parts[..., :2][seen]
        assert (xy >= 0).all() and (xy <= 95).all()


def test_position_spread_keeps_the_beak_tip_inside_for_the_largest_bird():
    from fgvc.data.synthetic import _bird_centre, bird_extent

    s, a = 96, 0.26 * 96
    b, hr = 0.7 * a, 0.35 * a
    rng = np.random.default_rng(0)
    for face in (1, -1):
        left, right, up, down = bird_extent(face, a, b, hr, 5.4, 2.1)
        for _ in range(200):
            cx, cy = _bird_centre(rng, s, 1.0, face, a, b, hr, 5.4, 2.1)
            assert left <= cx <= s - 1 - right and up <= cy <= s - 1 - down
        tip = 0.95 * a + 0.85 * hr + 5.4  # from the drawing: head centre 0.95 a, beak base 0.85 hr further
        assert (right if face > 0 else left) == pytest.approx(tip)


def test_centred_box_coverage_counts_images_whose_visible_class_parts_are_all_inside():
    # side 100, centred box of side 40: [30, 70] on both axes
    parts = np.array([
        [[50, 50, 1], [0, 0, 0]],    # inside (the other part hidden)
        [[50, 50, 1], [80, 50, 1]],  # one visible part outside
        [[31, 69, 1], [69, 31, 1]],  # both inside, near the corners
        [[0, 0, 0], [0, 0, 0]],      # nothing visible: not counted
        [[20, 50, 1], [50, 20, 1]],  # outside
    ], dtype=float)
    assert centred_box_coverage(parts, 100, 40) == pytest.approx(2 / 4)
    assert centred_box_coverage(parts, 100, 100) == pytest.approx(1.0)


def test_position_spread_lowers_the_centred_box_coverage(tmp_path):
    """With the texture cue (the wing alone carries the class) a centred box of 4/9 of the side holds
    every wing of the default band, and far fewer once the bird moves and shrinks."""
    texture = dict(SPREAD, wing_cue="texture")
    fixed = class_part_keypoints(ensure_synthetic(tmp_path, SyntheticSpec(**texture)), "texture")
    moved = class_part_keypoints(ensure_synthetic(tmp_path, SyntheticSpec(**texture, position_spread=1.0, scale_min=0.5)),
                                 "texture")
    box = 96 * 4 / 9
    assert centred_box_coverage(fixed, 96, box) == 1.0
    assert centred_box_coverage(moved, 96, box) < 0.8


def test_texture_phase_shifts_each_wing_texture_and_is_off_by_default(tmp_path):
    light = np.array([0.9, 0.2, 0.4])
    for kind in range(len(WING_TEXTURES)):
        base = wing_texture(kind, light, 16, px=2)
        shifted = wing_texture(kind, light, 16, px=2, offset=(1, 3))
        np.testing.assert_allclose(shifted[:-1, :-3], base[1:, 3:])  # the same pattern, moved by (dy, dx)
    rows = wing_texture(WING_TEXTURES.index("rows"), light, 8, px=2)
    assert not np.allclose(wing_texture(WING_TEXTURES.index("rows"), light, 8, px=2, offset=(1, 0)), rows)
    texture = dict(SPREAD, wing_cue="texture", texture_px=2)
    plain = ensure_synthetic(tmp_path, SyntheticSpec(**texture))
    assert plain == ensure_synthetic(tmp_path, SyntheticSpec(**texture, texture_phase=False))
    phased = ensure_synthetic(tmp_path, SyntheticSpec(**texture, texture_phase=True))
    assert phased != plain and digest(phased) != digest(plain)
    assert '"texture_phase": true' in (phased / "fgvc_synthetic.json").read_text()
