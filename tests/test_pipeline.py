"""The fast data pipeline (issue 17): crop first, reduced JPEG decode, one resize, uint8 images
normalised on the model's device; RandAugment and random erasing; equal or close to the old path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fgvc.bench.data_speed import photo_like
from fgvc.data.records import ImageFile, load_rgb
from fgvc.data.transforms import PairedTransform, random_erase, sample_crop
from fgvc.models.build import model_input

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def old_normalise(img: np.ndarray) -> torch.Tensor:
    """The old pipeline's last step (albumentations Normalize, in the loading process)."""
    import albumentations as A

    out = A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0)(image=img)["image"]
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def test_evaluation_image_normalised_on_the_device_equals_the_old_pipeline():
    img = np.asarray(photo_like(120, 90, 0))
    t = PairedTransform(64, False, MEAN, STD)
    out, _, _ = t(img, None, None)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    net = torch.nn.Module()
    net.register_buffer("input_mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
    net.register_buffer("input_std", torch.tensor(STD).view(1, 3, 1, 1) * 255)
    ours = model_input(net, out[None])[0]
    torch.testing.assert_close(ours, old_normalise(out.permute(1, 2, 0).numpy()), atol=1e-5, rtol=0)
    floats = torch.randn(2, 3, 8, 8)
    assert model_input(net, floats) is floats  # already normalised inputs pass unchanged


def test_training_crop_matches_the_old_albumentations_resize_of_the_same_crop():
    img = np.asarray(photo_like(200, 150, 1))
    t = PairedTransform(96, True, MEAN, STD, crop_scale=(0.3, 1.0), hflip=0.0, annotations=False)
    t.set_random_seed(7)
    out, _, _ = t(img, None, None)
    x, y, w, h = sample_crop(200, 150, (0.3, 1.0), np.random.default_rng(7))  # the same draw
    import albumentations as A

    ref = A.Resize(96, 96)(image=np.ascontiguousarray(img[y:y + h, x:x + w]))["image"]
    assert np.array_equal(out.permute(1, 2, 0).numpy(), ref)


def test_crop_statistics_follow_the_scale_and_ratio():
    rng = np.random.default_rng(0)
    boxes = np.array([sample_crop(500, 375, (0.25, 1.0), rng) for _ in range(2000)])
    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    ratio = boxes[:, 2] / boxes[:, 3]
    assert area.min() >= 0.24 and area.max() <= 1.0 and 0.45 < np.median(area) < 0.75
    assert ratio.min() >= 0.74 and ratio.max() <= 1.34
    assert (boxes[:, 0] + boxes[:, 2] <= 500).all() and (boxes[:, 1] + boxes[:, 3] <= 375).all()


def test_reduced_jpeg_decode_is_used_when_the_crop_allows_and_stays_close(tmp_path):
    path = tmp_path / "car.jpg"
    photo_like(1024, 768, 2).save(path, quality=90)
    f = ImageFile(path)
    half, scale = f.decode(reduce=2.3)
    assert scale == 2 and half.shape == (384, 512, 3)  # decoded at half size in the DCT
    import cv2

    t = PairedTransform(96, True, MEAN, STD, crop_scale=(0.5, 1.0), hflip=0.0, annotations=False)
    whole = load_rgb(path)
    for seed in range(4):  # same seed, same crop (about 540-1024 px wide, shrunk to 96 px)
        t.set_random_seed(seed)
        fast = t(ImageFile(path), None, None)[0].permute(1, 2, 0).float()  # decoded at 1/4 or 1/2 scale
        t.set_random_seed(seed)
        full = t(whole, None, None)[0].permute(1, 2, 0).float()  # decoded whole, as before
        x, y, w, h = sample_crop(1024, 768, (0.5, 1.0), np.random.default_rng(seed))
        s = ImageFile(path).decode(min(w, h) / 96)[1]  # the crop's edges snap to the decoded grid
        x0, y0, x1, y1 = (int(round(v / s) * s) for v in (x, y, x + w, y + h))
        area = torch.from_numpy(cv2.resize(whole[y0:y1, x0:x1], (96, 96), interpolation=cv2.INTER_AREA)).float()
        # against an area-averaged reference of the same region the reduced decode is close (the whole
        # decode, shrunk by plain bilinear interpolation as before, aliases the grain)
        fast_err, full_err = (fast - area).abs().mean().item(), (full - area).abs().mean().item()
        assert s > 1 and fast_err < 2.5 and fast_err <= full_err, (seed, fast_err, full_err)


def test_bottom_crop_is_cut_at_every_decode_scale(tmp_path):
    pixels = np.zeros((400, 640, 3), np.uint8)
    pixels[-40:] = 255  # a white banner of 40 rows
    path = tmp_path / "plane.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    f = ImageFile(path, bottom_crop=40)
    assert f.size == (640, 360)
    for reduce in (1, 2, 4):
        img, scale = ImageFile(path, bottom_crop=40).decode(reduce)
        assert img.shape[0] == round(360 / scale) and img.max() < 60  # no banner left


def test_random_erasing_fills_one_rectangle_with_normalised_noise():
    img = np.full((64, 64, 3), 7, np.uint8)
    rng = np.random.default_rng(0)
    mean, std = np.asarray(MEAN, np.float32) * 255, np.asarray(STD, np.float32) * 255
    out = random_erase(img, 1.0, mean, std, rng)
    changed = (out != 7).any(-1)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 0 and changed[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.95  # a rectangle
    assert img.max() == 7  # the input is not changed
    normalised = (out[changed].astype(np.float32) - mean) / std
    assert abs(normalised.mean()) < 0.3 and 0.6 < normalised.std() < 1.2
    assert random_erase(img, 0.0, mean, std, rng) is img


@pytest.mark.parametrize("keys", [{"randaugment": "rand-m9-mstd0.5-inc1"}, {"random_erasing": 1.0}])
def test_randaugment_and_erasing_change_images_and_repeat_with_the_seed(keys):
    img = np.asarray(photo_like(80, 60, 3))
    plain = PairedTransform(48, True, MEAN, STD, annotations=False)
    t = PairedTransform(48, True, MEAN, STD, annotations=False, **keys)
    state = np.random.get_state()
    outs = []
    for tr in (plain, t, t):
        tr.set_random_seed(11)
        outs.append(tr(img, None, None)[0])
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert np.array_equal(np.random.get_state()[1], state[1])  # global generators given back


def test_randaugment_with_annotations_is_refused():
    with pytest.raises(ValueError, match="boxes and parts"):
        PairedTransform(48, True, MEAN, STD, annotations=True, randaugment="rand-m9")


def test_the_data_benchmark_times_the_training_pipeline():
    from fgvc.bench.data_speed import data_speed

    page = data_speed(num_images=2, rounds=1)
    rows = [line for line in page.splitlines() if line.startswith("| CUB") or line.startswith("| Cars")]
    assert len(rows) == 2 and all(float(r.split("|")[2].split()[0]) > 0 for r in rows)  # images/s measured
    assert "loading processes" in page
