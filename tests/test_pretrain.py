"""The fractal pretraining set, the pretraining command, and its weights in every synth_ recipe."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import run_script
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fgvc.bench.pretrain import (
    export_backbone,
    pretrain_recipe,
    recipe_backbones,
    sha256,
    synth_backbones,
    synth_recipes,
    weights_name,
)
from fgvc.config import load_recipe
from fgvc.data.build import read_index
from fgvc.data.fractal import (
    FractalSpec,
    chaos_game,
    class_systems,
    filling_rate,
    render,
)
from fgvc.errors import UserError
from fgvc.models.build import build_model

SMALL = FractalSpec(num_classes=5, train_per_class=3, test_per_class=2, image_size=48, points=3000)


def test_fractal_images_are_deterministic_and_classes_differ():
    a, b = render(SMALL, 1, 0), render(SMALL, 1, 0)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(render(SMALL, 1, 0), render(SMALL, 1, 1))  # variation within a class
    (m1, _), (m2, _) = class_systems(SMALL)[:2]
    assert m1.shape[1:] == (2, 2) and not (m1.shape == m2.shape and np.allclose(m1, m2))
    other_seed = class_systems(FractalSpec(num_classes=5, seed=1))[0][0]
    assert not (other_seed.shape == m1.shape and np.allclose(other_seed, m1))


def test_class_colours_give_each_class_its_own_hues_and_zero_changes_nothing():
    import colorsys
    import dataclasses

    coloured = dataclasses.replace(SMALL, class_colours=1.0)
    assert np.array_equal(render(dataclasses.replace(SMALL, class_colours=0.0), 2, 1), render(SMALL, 2, 1))
    assert not np.array_equal(render(coloured, 2, 1), render(SMALL, 2, 1))

    def ink_hues(img):  # hues of the pixels that differ most from the image's smooth background
        flat = img.reshape(-1, 3).astype(float) / 255
        far = np.abs(flat - np.median(flat, 0)).sum(1) > 0.5
        return np.array([colorsys.rgb_to_hsv(*px)[0] for px in flat[far]])

    def hue_histogram(label, index):
        return np.histogram(ink_hues(render(coloured, label, index)), bins=12, range=(0, 1))[0] > 0

    same = [(hue_histogram(c, 0) & hue_histogram(c, 1)).sum() / hue_histogram(c, 0).sum() for c in range(5)]
    assert np.mean(same) > 0.6  # two images of a class share most of their hue bins


def test_every_class_system_is_contractive_and_fills_the_grid():
    for maps, shifts in class_systems(SMALL):
        assert (np.linalg.svd(maps, compute_uv=False) < 1).all()  # an attractor exists
        pts, which = chaos_game(maps, shifts, 4000, np.random.default_rng(0))
        assert filling_rate(pts) >= SMALL.min_fill and which.max() < len(maps)
    line = np.stack([np.linspace(0, 1, 500), np.zeros(500)], 1)
    assert filling_rate(line) < 0.02  # a degenerate attractor is rejected


def test_fractal_data_set_from_the_recipe():
    cfg = load_recipe(["recipe=fractal_pretrain", "data.fractal.num_classes=4", "data.fractal.train_per_class=3",
                       "data.fractal.test_per_class=2"])
    index = read_index(cfg.data)
    assert index.num_classes == 4 and len(index.train) == 12 and len(index.test) == 8
    s = index.train[5]
    assert s.label == 1 and s.render().shape == (cfg.data.fractal.image_size,) * 2 + (3,)


def test_dcn_refuses_model_weights_instead_of_ignoring_it():
    cfg = load_recipe(["recipe=synth_dcn", "model.weights=some.safetensors"])
    with pytest.raises(UserError, match="model.dcn.coarse_weights"):
        build_model(cfg.model, 4, cfg.data.image_size)


def test_every_synth_backbone_is_pretrained_by_the_command():
    assert set(synth_backbones()) == {"test_resnet", "test_vit"}  # the DCN's coarse and fine networks included (both test_resnet)


def test_vit_pretrain_then_finetune_loads_every_tensor_but_the_head(tmp_path):
    """synth_vit's backbone is pretrained by its own fractal recipe; the exported file, given to
    synth_vit's model.weights, fills every ViT tensor (embeddings, blocks, norm) and leaves only the
    classifier new."""
    from safetensors.torch import save_file

    from fgvc.models.build import build_model

    recipe = pretrain_recipe("test_vit")
    pre_cfg, fine_cfg = load_recipe([f"recipe={recipe}"]), load_recipe(["recipe=synth_vit"])
    assert recipe != "fractal_pretrain" and pre_cfg.train.optimizer == "adamw"
    assert fine_cfg.model.weights.endswith(weights_name(fine_cfg.model.backbone))
    torch.manual_seed(0)
    pre = build_model(pre_cfg.model, pre_cfg.data.fractal.num_classes, pre_cfg.data.image_size)  # what pretraining trains
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(run / "model.safetensors"))
    export_backbone(run, "test_vit", tmp_path / "vit.safetensors", "test")

    torch.manual_seed(1)  # another initialisation: a tensor equal to the pretrained one was loaded
    fine = build_model(OmegaConf.merge(fine_cfg.model, {"weights": str(tmp_path / "vit.safetensors")}), 16,
                       fine_cfg.data.image_size)
    before, after = pre.state_dict(), fine.state_dict()
    loaded = {k for k in after if k in before and after[k].shape == before[k].shape and torch.equal(after[k], before[k])}
    new = set(after) - loaded
    assert new == {"net.head.weight", "net.head.bias"}, sorted(new)
    assert fine.pretrained_names == {n for n, _ in fine.named_parameters()} - new
    x = torch.randn(2, 3, fine_cfg.data.image_size, fine_cfg.data.image_size)
    assert fine.eval()(x).shape == (2, 16)


@pytest.mark.slow
def test_pretrain_command_weights_load_into_every_synth_recipe(tmp_path):
    """Tiny budget: every backbone trained and exported; each synth_ recipe's networks (DCN coarse and
    fine included) take every tensor from the files, and no file tensor is left unused."""
    out, runs = tmp_path / "weights", tmp_path / "runs"
    tiny = ["data.fractal.num_classes=4", "data.fractal.train_per_class=4", "data.fractal.test_per_class=2",
            "data.fractal.image_size=40", "data.fractal.points=2000", "data.image_size=32", "train.epochs=1",
            "train.batch_size=6", "data.val_fraction=0.25"]  # 12 training images: no batch of one
    proc = run_script("benchmark.py", "pretrain", "--out", str(out), "--runs", str(runs), "--set", *tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = {b: out / weights_name(b) for b in synth_backbones()}
    for f in files.values():
        assert f.with_name(f.name + ".sha256").read_text().split()[0] == sha256(f)
        assert "python fgvc/benchmark.py pretrain" in (out / "README.md").read_text()
    for recipe in synth_recipes():
        cfg = load_recipe([f"recipe={recipe}"])
        roles = recipe_backbones(cfg)
        if not roles:  # a recipe trained from scratch (none today)
            continue
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{role}={files[b]}" for role, b in roles.items()]))
        model = build_model(cfg.model, 5, 64)
        nets = {"model.weights": [m for n, m in model.named_modules() if n in ("net", "backbones.0", "backbones.1",
                                                                               "backbones.2")],
                "model.dcn.coarse_weights": [model.coarse.net] if getattr(model, "coarse", None) else [],
                "model.dcn.fine_weights": [model.fine.net] if hasattr(model, "fine") else []}
        for role, backbone in roles.items():
            saved = load_file(str(files[backbone]))
            assert nets[role], (recipe, role)
            for net in nets[role]:
                state = net.state_dict()
                # the backbone's own tensors (attention blocks added to it are new, not pretrained)
                wanted = (set(state) if role == "model.dcn.coarse_weights"
                          else set(timm.create_model(backbone, num_classes=0).state_dict()))
                assert wanted <= set(saved), (recipe, role, sorted(wanted - set(saved))[:3])  # none missing
                unused = set(saved) - wanted  # only the stages a truncated coarse network leaves out
                assert not unused or role == "model.dcn.coarse_weights", (recipe, role, sorted(unused)[:3])
                assert all(k.startswith(("layer3.", "layer4.")) for k in unused), (recipe, sorted(unused)[:3])
                # a transformer built for another side than its file's gets its position embeddings resampled
                resampled = {k for k in wanted if state[k].shape != saved[k].shape}
                assert all(k.endswith("pos_embed") for k in resampled), (recipe, sorted(resampled)[:3])
                assert all(torch.equal(state[k], saved[k].to(state[k].dtype)) for k in wanted - resampled), (recipe, role)
        assert model.pretrained_names  # the trainer knows which parameters came from the files
