"""The built-in synthetic set: CUB layout, determinism, and cues where the parts say."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fgvc.data.records import CUB_PARTS, DATASETS
from fgvc.data.synthetic import (WING_TEXTURES, SyntheticSpec, class_codes, class_parts, ensure_synthetic, wing_texture,
                                 write_synthetic)
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
