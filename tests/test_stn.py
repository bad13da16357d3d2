"""Spatial transformer (fgvc/models/attention/stn.py) at full resolution and with parallel transformers
(model.attention.stn_count), and the data pipeline that delivers the full-resolution image
(data.full_resolution)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fgvc.analysis.maps import compute_maps
from fgvc.config import load_recipe
from fgvc.data.build import build_transform, delivered_side
from fgvc.errors import UserError
from fgvc.models.attention.stn import LN2, MIN_SCALE, SpatialTransformer, sample_windows, shrink
from fgvc.models.build import build_model

FULL, SIDE, CLASSES = 64, 32, 5  # delivered image side, network input side


def window_raw(scale: float, tx: float, ty: float) -> list[float]:
    """The localisation network's raw outputs (a, bx, by) for the window side `scale` (< 1, a
    fraction of the image) centred at (tx, ty) in [-1, 1] coordinates (inverse of stn.py's bounds)."""
    a = math.log(math.expm1(math.atanh((1 - scale) / (1 - MIN_SCALE)) + LN2))  # softplus^-1
    return [a, math.atanh(tx / (1 - scale)), math.atanh(ty / (1 - scale))]


def test_the_sampled_region_is_read_from_the_full_resolution_image():
    """A window of half the 64-px image's side, centred 16 px right and up of the middle, sampled
    at the 32-px network input: exactly the original's pixels [8, 40) x [24, 56), one per output
    pixel, none of them shrunk to 32 px first."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, FULL, FULL)
    stn = SpatialTransformer(SIDE)
    with torch.no_grad():
        stn.localization.fc[-1].bias.copy_(torch.tensor(window_raw(0.5, 0.25, -0.25)))
        windows = stn(x)  # (B, 1, 3, S, S)
    assert windows.shape == (2, 1, 3, SIDE, SIDE)
    torch.testing.assert_close(windows[:, 0], x[:, :, 8:40, 24:56], atol=1e-4, rtol=0)
    # the same from a known theta, two windows at once: the top-left and bottom-right quadrants
    theta = torch.tensor([[[0.5, 0, -0.5], [0, 0.5, -0.5]], [[0.5, 0, 0.5], [0, 0.5, 0.5]]]).expand(2, 2, 2, 3)
    quadrants = sample_windows(x, theta, SIDE)  # (B, 2, 3, S, S)
    torch.testing.assert_close(quadrants[:, 0], x[:, :, :32, :32], atol=1e-5, rtol=0)
    torch.testing.assert_close(quadrants[:, 1], x[:, :, 32:, 32:], atol=1e-5, rtol=0)


def test_identity_start_sees_the_whole_image_at_the_input_size():
    x = torch.rand(2, 3, FULL, FULL)
    out = SpatialTransformer(SIDE, count=2, identity_init=True)(x)  # (B, 2, 3, S, S)
    expected = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True)
    torch.testing.assert_close(out, expected[:, None].expand_as(out), atol=0, rtol=0)
    assert torch.equal(shrink(x[..., :SIDE, :SIDE], SIDE), x[..., :SIDE, :SIDE])  # already the input size


def test_antialiased_sampler_reads_every_pixel_of_the_window_and_starts_as_the_whole_image():
    """sampler="antialias": at the identity transform the shrunk whole image (the plain network's input)
    with no gamma blend; a window of at most the input's side in source pixels is read pixel for pixel
    (as the bilinear sampler); in between, the mix of the two readings; the window's position gets a
    gradient at the first step, where the identity-started bilinear sampler (gamma = 0) gives it none."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, FULL, FULL)
    stn = SpatialTransformer(SIDE, identity_init=True, sampler="antialias")
    assert stn.gamma is None
    torch.testing.assert_close(stn(x)[:, 0], shrink(x, SIDE), atol=1e-5, rtol=0)
    with torch.no_grad():
        stn.localization.fc[-1].bias.copy_(torch.tensor(window_raw(0.5, 0.25, -0.25)))
        torch.testing.assert_close(stn(x)[:, 0], x[:, :, 8:40, 24:56], atol=1e-4, rtol=0)
        stn.localization.fc[-1].bias.copy_(torch.tensor(window_raw(0.75, 0.0, 0.0)))  # f = 1.5: w = 1/2
        sharp = F.grid_sample(x, F.affine_grid(torch.tensor([[[0.75, 0, 0], [0, 0.75, 0.0]]]).expand(2, 2, 3),
                                               [2, 3, SIDE, SIDE], align_corners=False), align_corners=False)
        full = F.grid_sample(x, F.affine_grid(torch.tensor([[[0.75, 0, 0], [0, 0.75, 0.0]]]).expand(2, 2, 3),
                                              [2, 3, FULL, FULL], align_corners=False), align_corners=False)
        torch.testing.assert_close(stn(x)[:, 0], (sharp + shrink(full, SIDE)) / 2, atol=1e-4, rtol=0)
    # the whole 48-px image at 32 px (1.5 source pixels per output pixel, the benchmark's 192 to 128):
    # a one-pixel checkerboard averages out instead of turning into a moire
    side = SIDE * 3 // 2
    checker = ((torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2).float().expand(1, 3, side, side)
    smooth = SpatialTransformer(SIDE, sampler="antialias")(checker)
    assert (smooth - 0.5).abs().max() < 0.05
    assert (SpatialTransformer(SIDE)(checker) - 0.5).abs().max() > 0.1  # the bilinear grid at the input size: a moire
    grads = {}
    for sampler in ("bilinear", "antialias"):
        torch.manual_seed(1)
        t = SpatialTransformer(SIDE, identity_init=True, sampler=sampler)
        t(x).square().mean().backward()
        grads[sampler] = t.localization.fc[-1].weight.grad.abs().sum().item()
    assert grads["bilinear"] == 0 and grads["antialias"] > 0
    with pytest.raises(ValueError, match="sampler"):
        SpatialTransformer(SIDE, sampler="nearest")
    with pytest.raises(UserError, match="model.attention.stn_sampler"):
        load_recipe(["recipe=synth_cbam", "model.attention.stn_sampler=antialias"])
    model = stn_model(1, "model.attention.stn_sampler=antialias")
    assert model.stn.sampler == "antialias"


def stn_model(count: int, *extra: str):
    cfg = load_recipe(["recipe=synth_stn", f"model.attention.stn_count={count}", f"data.image_size={SIDE}",
                       "data.full_resolution=2", *extra])
    torch.manual_seed(0)
    return build_model(cfg.model, CLASSES, cfg.data.image_size)


@pytest.mark.parametrize("count", [2, 4])
def test_parallel_transformers_build_train_and_concatenate_their_features(count):
    model = stn_model(count, "model.attention.init=default").train()  # the paper's start: every part learns
    channels = model.net.num_features
    assert model.stn.count == count and model.stn_head.in_features == count * channels
    x, y = torch.rand(4, 3, FULL, FULL), torch.randint(0, CLASSES, (4,))
    # the logits are one linear map of the windows' pooled features, concatenated window by window
    with torch.no_grad():
        model.eval()
        windows = model.stn(x)  # (B, N, 3, S, S)
        pooled = [model.net.forward_head(model.net.forward_features(windows[:, i]), pre_logits=True)
                  for i in range(count)]  # N x (B, C)
        torch.testing.assert_close(model(x), model.stn_head(torch.cat(pooled, 1)), atol=1e-5, rtol=1e-5)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"net", "stn", "stn_head"}
    assert not torch.equal(model.stn.localization.fc[-1].weight, before["stn.localization.fc.2.weight"])
    # the analysis reads every window: CAM unwarped from each, the union of their regions
    maps = compute_maps(model.eval(), x[:2]).maps
    assert {"cam", "stn_region"} <= set(maps) and all(m.shape == (2, FULL, FULL) for m in maps.values())


def test_identity_start_with_parallel_transformers_is_a_plain_classifier():
    model = stn_model(2, "model.attention.init=identity").eval()
    x = torch.rand(2, 3, FULL, FULL)
    channels = model.net.num_features
    with torch.no_grad():
        pooled = model.net.forward_head(model.net.forward_features(shrink(x, SIDE)), pre_logits=True)  # (B, C)
        plain = F.linear(pooled, model.stn_head.weight[:, :channels], model.stn_head.bias)
        torch.testing.assert_close(model(x), plain, atol=1e-5, rtol=1e-5)


def test_full_resolution_delivers_larger_images_and_its_mistakes_are_user_errors():
    cfg = load_recipe(["recipe=synth_racnn", "data.image_size=32", "data.full_resolution=1.5"])
    assert delivered_side(cfg.data) == 48
    t = build_transform(cfg.data, False, (0.5,) * 3, (0.25,) * 3, [])
    image, box, parts = t((torch.rand(60, 80, 3) * 255).byte().numpy(), None, None)
    assert image.shape == (3, 48, 48)
    assert delivered_side(load_recipe(["recipe=synth_baseline", "data.image_size=64"]).data) == 64  # default 1: unchanged
    for args, phrase in ((["recipe=synth_baseline", "data.full_resolution=2"], "data.full_resolution"),
                         (["recipe=synth_racnn", "data.full_resolution=0.5"], "at least 1"),
                         (["recipe=synth_cbam", "model.attention.stn_count=2"], "model.attention.stn_count"),
                         (["recipe=synth_stn", "model.attention.stn_count=3"], "one of")):
        with pytest.raises(UserError, match=phrase):
            load_recipe(args)


def test_crop_only_cuts_the_window_at_the_image_and_passes_the_gradient_through():
    """stn_crop_only: side min(s, 1) with s = 1 - (1 - MIN_SCALE) tanh(softplus(a) - ln 2); the same
    transform as the default wherever s <= 1 (a >= 0), the default's gradient everywhere."""
    from fgvc.models.attention.stn import Localization

    torch.manual_seed(0)
    default, crop = Localization(), Localization(crop_only=True)
    crop.load_state_dict(default.state_dict())
    x = torch.rand(2, 3, FULL, FULL)
    for a in (-2.0, -0.5, 0.0, 0.7, 3.0):
        for net in (default, crop):
            torch.nn.init.constant_(net.fc[-1].bias, 0.0)
            net.fc[-1].bias.data[0] = a
            net.fc[-1].bias.data[1] = 0.4  # bx
        theta0, theta1 = default(x), crop(x)
        s = 1 - (1 - MIN_SCALE) * math.tanh(math.log1p(math.exp(a)) - LN2)
        torch.testing.assert_close(theta0[..., 0, 0].detach(), torch.full((2, 1), s), atol=1e-6, rtol=0)
        torch.testing.assert_close(theta1[..., 0, 0].detach(), torch.full((2, 1), min(s, 1.0)), atol=1e-6, rtol=0)
        if s <= 1:
            assert torch.equal(theta0, theta1)
        else:  # a zoom-out in the default; the crop-only window is the whole image, centred
            assert theta1[..., :, 2].abs().max() == 0
        for net in (default, crop):
            net.zero_grad()
            net(x)[..., 0, 0].sum().backward()
        assert crop.fc[-1].bias.grad[0] == pytest.approx(default.fc[-1].bias.grad[0].item(), rel=1e-6)
        assert default.fc[-1].bias.grad[0] != 0


def test_crop_only_is_read_from_the_recipe_and_only_by_the_stn():
    cfg = load_recipe(["recipe=synth_stn", "model.attention.stn_crop_only=true"])
    model = build_model(cfg.model, CLASSES, SIDE)
    assert model.stn.localization.crop_only
    assert not build_model(load_recipe(["recipe=synth_stn"]).model, CLASSES, SIDE).stn.localization.crop_only
    with pytest.raises(UserError, match="stn_crop_only"):
        load_recipe(["recipe=synth_baseline", "model.attention.stn_crop_only=true"])


@pytest.mark.parametrize("start", [0.5, 0.8, 1.0])
def test_start_scale_is_a_centred_window_whose_position_has_a_gradient(start):
    """stn_start_scale: theta = [[s, 0, 0], [0, s, 0]] with s = start_scale at initialisation, whatever
    the image; below 1 the translation (t = relu(1 - s) tanh(b)) gets a gradient from the first step,
    at the identity it gets none."""
    from fgvc.models.attention.stn import Localization

    torch.manual_seed(0)
    loc = Localization(crop_only=True, start_scale=start)
    x = torch.rand(3, 3, FULL, FULL)
    theta = loc(x)
    want = torch.tensor([[start, 0.0, 0.0], [0.0, start, 0.0]]).expand(3, 1, 2, 3)
    torch.testing.assert_close(theta.detach(), want, atol=1e-6, rtol=0)
    theta[..., 0, 2].sum().backward()  # the window's horizontal position
    moved = loc.fc[-1].bias.grad[1].item()  # d t_x / d b_x = relu(1 - s) at b = 0
    assert moved == pytest.approx(3 * (1 - start), abs=1e-6)


def test_start_scale_is_read_from_the_recipe_and_checked():
    cfg = load_recipe(["recipe=synth_stn", "model.attention.stn_start_scale=0.5"])
    model = build_model(cfg.model, CLASSES, SIDE)
    assert model.stn.localization(torch.rand(1, 3, SIDE, SIDE))[0, 0, 0, 0].item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(UserError, match="stn_start_scale"):
        load_recipe(["recipe=synth_baseline", "model.attention.stn_start_scale=0.5"])
    with pytest.raises(UserError, match="model.attention.stn_start_scale is 0.2"):
        build_model(load_recipe(["recipe=synth_stn", "model.attention.stn_start_scale=0.2"]).model, CLASSES, SIDE)


def test_fixed_scale_keeps_the_side_and_learns_only_the_position():
    from fgvc.models.attention.stn import Localization

    torch.manual_seed(0)
    loc = Localization(crop_only=True, start_scale=0.5, fixed_scale=True)
    with torch.no_grad():
        loc.fc[-1].bias.copy_(torch.tensor([3.0, 0.4, -0.2]))  # a would shrink the window; bx, by move it
    theta = loc(torch.rand(2, 3, FULL, FULL))
    assert torch.all(theta[..., 0, 0] == 0.5) and torch.all(theta[..., 1, 1] == 0.5)
    torch.testing.assert_close(theta[0, 0, :, 2].detach(), 0.5 * torch.tanh(torch.tensor([0.4, -0.2])))
    theta[..., :, 2].sum().backward()
    grad = loc.fc[-1].bias.grad
    assert grad[0] == 0 and grad[1] != 0 and grad[2] != 0  # the side has no gradient, the position has
    with pytest.raises(UserError, match="cannot move"):
        Localization(start_scale=1.0, fixed_scale=True)
    with pytest.raises(UserError, match="stn_fixed_scale"):
        load_recipe(["recipe=synth_baseline", "model.attention.stn_fixed_scale=true"])
    cfg = load_recipe(["recipe=synth_stn", "model.attention.stn_start_scale=0.6", "model.attention.stn_fixed_scale=true"])
    assert build_model(cfg.model, CLASSES, SIDE).stn.localization.fixed_scale == 0.6
