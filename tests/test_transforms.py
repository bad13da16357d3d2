"""Boxes and part keypoints follow the image through the pipelines exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgvc.data.records import CUB_PARTS, flip_pairs_from_names
from fgvc.data.transforms import PairedTransform

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def image_with_dots(h, w, points):
    img = np.zeros((h, w, 3), np.uint8)
    for x, y in points:
        img[int(y), int(x)] = 255
    return img


def test_eval_resize_and_centre_crop_move_points_exactly():
    h, w = 100, 200  # short side 100 -> 64 * 1.0 = 64, width 128; centre crop 64 -> x offset 32
    parts = np.array([[100.0, 50.0, 1], [10.0, 10.0, 1], [0, 0, 0]], np.float32)
    t = PairedTransform(64, train=False, mean=MEAN, std=STD, eval_resize=1.0)
    img, box, out = t(np.zeros((h, w, 3), np.uint8), np.array([50, 20, 100, 60], np.float32), parts)
    assert img.shape == (3, 64, 64)
    scale = 64 / 100
    np.testing.assert_allclose(out[0].numpy(), [100 * scale - 32, 50 * scale, 1], atol=1e-4)
    assert out[1, 2] == 0  # x = 6.4 - 32 < 0: left the crop, so no longer visible
    assert out[2].tolist() == [0, 0, 0]  # invisible stays invisible
    np.testing.assert_allclose(box.numpy(), [50 * scale - 32, 20 * scale, 150 * scale - 32, 80 * scale], atol=1e-4)


def test_flip_mirrors_points_and_swaps_left_right_parts():
    pairs = flip_pairs_from_names(CUB_PARTS)
    assert (CUB_PARTS.index("left eye"), CUB_PARTS.index("right eye")) in pairs
    parts = np.zeros((15, 3), np.float32)
    le, re = CUB_PARTS.index("left eye"), CUB_PARTS.index("right eye")
    parts[le] = [10, 20, 1]
    t = PairedTransform(32, train=True, mean=MEAN, std=STD, crop_scale=(1.0, 1.0), hflip=1.0, flip_pairs=pairs)
    t.set_random_seed(0)
    img = image_with_dots(32, 32, [(10, 20)])
    out_img, _, out = t(img, None, parts)
    assert out[le, 2] == 0 and out[re, 2] == 1  # the left eye, mirrored, is the right eye
    assert out[re, 0].item() == pytest.approx(32 - 10) and out[re, 1].item() == pytest.approx(20)
    ys, xs = np.nonzero(out_img[0].numpy() > 0.5)
    assert (xs[0], ys[0]) == (31 - 10, 20)  # pixel (10) lands at index 21 = width - 1 - 10


def test_random_crop_keeps_keypoints_on_their_pixels():
    # 15 points on a grid, each marked by a 5x5 patch of its own red value; after a random
    # resized crop (and maybe a flip) each visible point must sit on its own colour
    pts = np.array([(12 + 18 * (i % 5), 20 + 25 * (i // 5)) for i in range(15)], np.float32)
    parts = np.concatenate([pts, np.ones((15, 1), np.float32)], 1)
    img = np.zeros((96, 96, 3), np.uint8)
    for i, (x, y) in enumerate(pts.astype(int)):
        img[y - 2:y + 3, x - 2:x + 3, 0] = 10 + 15 * i
    t = PairedTransform(96, train=True, mean=MEAN, std=STD, crop_scale=(0.6, 1.0), hflip=0.5)
    t.set_random_seed(1)
    checked = 0
    for _ in range(8):
        out_img, _, out = t(img, None, parts)
        for i in np.nonzero(out[:, 2].numpy() > 0)[0]:
            x, y = out[i, :2].numpy()
            value = out_img[0, int(round(y)), min(95, int(round(x)))].item()  # uint8
            assert abs(value - (10 + 15 * i)) < 3, (i, value)
            checked += 1
    assert checked > 40


def test_seeded_pipeline_repeats_and_differs_by_seed():
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    t = PairedTransform(32, train=True, mean=MEAN, std=STD)
    t.set_random_seed(5)
    a = t(img, None, None)[0]
    t.set_random_seed(5)
    b = t(img, None, None)[0]
    t.set_random_seed(6)
    c = t(img, None, None)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("train,annotations", [(False, True), (True, False)])
def test_antialias_averages_away_detail_finer_than_the_output_pixels(train, annotations):
    """data.antialias: a one-pixel checker shrunk 192 -> 128 px blurs to its mean (PIL's widened filter, as
    the models shrink a full-resolution image); bilinear sampling keeps a strong moire. Both paths:
    evaluation and training's fast path."""
    y, x = np.mgrid[0:192, 0:192]
    checker = np.repeat((((x + y) % 2) * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    spread = {}
    for antialias in (False, True):
        t = PairedTransform(128, train=train, mean=MEAN, std=STD, crop_scale=(1.0, 1.0), hflip=0.0,
                            eval_resize=1.0, annotations=annotations, antialias=antialias)
        t.set_random_seed(0)
        img = t(checker, np.array([0, 0, 191, 191], np.float32), np.zeros((0, 3), np.float32))[0]
        img = img.float() / 255 if img.dtype == torch.uint8 else img
        spread[antialias] = float(img.std())
        assert abs(float(img.mean()) - 0.5) < 0.05  # the mean grey is kept either way
    assert spread[True] < 0.25 * spread[False]


def test_antialias_evaluation_moves_points_as_without_it():
    parts = np.array([[100.0, 50.0, 1], [10.0, 10.0, 1]], np.float32)
    outs = [PairedTransform(64, train=False, mean=MEAN, std=STD, eval_resize=1.0, antialias=a)(
        np.zeros((100, 200, 3), np.uint8), np.array([50, 20, 100, 60], np.float32), parts) for a in (False, True)]
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-3)
    np.testing.assert_allclose(outs[0][2], outs[1][2], atol=1e-3)
