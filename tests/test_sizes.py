"""Transformers at the sizes the field trains them at (fgvc/models/sizes.py): built for the recipe's
side from weights made at another, and a side a backbone cannot take refused before any work."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from fgvc.config import load_recipe
from fgvc.errors import UserError
from fgvc.models.classifier import create_backbone
from fgvc.models.sizes import build_args, check_side
from conftest import run_script

TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def _saved(net: torch.nn.Module, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def test_vit_from_160_px_weights_reads_240_px_images(tmp_path):
    """test_vit's weights are made for 160 px (10 x 10 patches); built at 240 px its position
    embeddings are resampled to 15 x 15, the class token's kept apart, every other tensor loaded as is."""
    small = timm.create_model("test_vit", num_classes=0)
    big, names = create_backbone("test_vit", 0, weights=_saved(small, tmp_path, "vit160"), image_size=240)
    c = small.embed_dim
    assert small.pos_embed.shape == (1, 1 + 10 * 10, c) and big.pos_embed.shape == (1, 1 + 15 * 15, c)
    torch.testing.assert_close(big.pos_embed[:, :1], small.pos_embed[:, :1])  # the class token's own
    assert not torch.allclose(big.pos_embed[:, 1:226:15], big.pos_embed[:, 2:227:15])  # a real grid, not one value
    torch.testing.assert_close(big.patch_embed.proj.weight, small.patch_embed.proj.weight)
    assert "pos_embed" in names
    assert big.forward_features(torch.randn(1, 3, 240, 240)).shape == (1, 1 + 15 * 15, c)


@pytest.mark.parametrize("name, side, kwargs, prefix", [
    ("deit_tiny_distilled_patch16_224", 336, dict(depth=1), 2),  # class and distillation tokens
    ("eva02_tiny_patch14_224", 336, dict(depth=1), 1),  # rotary embeddings rebuilt for the grid
])
def test_transformers_at_one_and_a_half_times_their_size(name, side, kwargs, prefix):
    net, _ = create_backbone(name, 5, image_size=side, **kwargs)
    tokens = net.forward_features(torch.randn(1, 3, side, side))
    assert tokens.shape[1] == prefix + (side // net.patch_embed.patch_size[0]) ** 2
    assert net(torch.randn(2, 3, side, side)).shape == (2, 5)


def test_swin_at_384_px_from_224_px_weights_has_a_window_of_12(tmp_path):
    """The Swin paper's 384-px fine-tuning: window 12 (the last stage one window), the relative
    position tables resized from 7's 13 x 13 offsets to 12's 23 x 23 when the weights load."""
    assert build_args("swin_tiny_patch4_window7_224", 384) == {"img_size": 384, "window_size": 12}
    small = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **TINY_SWIN)
    big, _ = create_backbone("swin_tiny_patch4_window7_224", 0, weights=_saved(small, tmp_path, "swin224"),
                             image_size=384, **TINY_SWIN)
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert small.state_dict()[table].shape == (13 * 13, 1) and big.state_dict()[table].shape == (23 * 23, 1)
    assert big.forward_features(torch.randn(1, 3, 384, 384)).shape == (1, 12, 12, 16 * 8)


def test_swin_v2_keeps_its_pretrained_window_for_the_position_bias():
    args = build_args("swinv2_tiny_window8_256", 384)
    assert args == {"img_size": 384, "window_size": 12, "pretrained_window_sizes": (8, 8, 8, 8)}
    net, _ = create_backbone("swinv2_tiny_window8_256", 3, image_size=384, **TINY_SWIN)
    assert net(torch.randn(1, 3, 384, 384)).shape == (1, 3)


def test_cnns_and_own_sizes_get_no_arguments():
    assert build_args("test_resnet", 448) == {} and build_args("test_vit", 160) == {}
    check_side("test_resnet", 37, "data.image_size")  # CNNs take any size


@pytest.mark.parametrize("overrides, words", [
    (["model.backbone=test_vit", "data.image_size=250"], ["data.image_size is 250", "'test_vit'", "240 or 256"]),
    (["model.backbone=swin_tiny_patch4_window7_224", "data.image_size=200"], ["multiple of 32", "192 or 224"]),
    (["model.backbone=test_maxvit", "data.image_size=240"], ["'test_maxvit'", "224 or 256"]),
    (["model.arch=dcn", "model.dcn.fine_backbone=test_vit", "model.dcn.patch_size=40"],
     ["model.dcn.patch_size is 40", "32 or 48"]),
])
def test_a_side_a_backbone_cannot_take_is_one_sentence(overrides, words):
    with pytest.raises(UserError) as err:
        load_recipe(["recipe=synth_baseline", *overrides])
    assert all(w in str(err.value) for w in words), str(err.value)


def test_the_refusal_comes_before_a_run_folder(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", "recipe=synth_baseline", "model.backbone=test_vit", "data.image_size=250",
                      f"output_dir={out}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data.image_size is 250 px" in proc.stderr + proc.stdout
    assert not out.exists()
