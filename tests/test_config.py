"""Recipes: loading, overrides, and every user error as one sentence with exit status 2."""

from __future__ import annotations

import pytest
from conftest import run_script
from omegaconf import OmegaConf

from fgvc.config import available_recipes, load_recipe
from fgvc.errors import UserError

REQUIRED = ["data.name", "data.root", "data.image_size", "data.val_fraction", "model.backbone",
            "model.pretrained", "train.epochs", "train.batch_size", "train.lr", "train.weight_decay",
            "train.warmup_epochs", "train.mixed_precision", "train.grad_accum_steps", "train.resume", "seed",
            "output_dir"]


def test_required_keys_exist():
    cfg = load_recipe([])
    for key in REQUIRED:
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key


def test_default_recipe_is_synth_baseline_and_output_dir_follows_name():
    cfg = load_recipe([])
    assert cfg.recipe == "synth_baseline" and cfg.data.name == "synthetic"
    assert cfg.output_dir == "runs/synth_baseline"


@pytest.mark.parametrize("name", available_recipes())
def test_every_recipe_loads(name):
    cfg = load_recipe([f"recipe={name}"])
    assert cfg.recipe == name


def test_overrides_are_typed_and_win():
    cfg = load_recipe(["recipe=cub_baseline", "train.lr=0.5", "data.crop_scale=[0.5,1.0]", "seed=3"])
    assert cfg.train.lr == 0.5 and list(cfg.data.crop_scale) == [0.5, 1.0] and cfg.seed == 3
    assert cfg.data.name == "cub" and cfg.data.image_size == 448  # from the recipe file
    assert cfg.train.optimizer == "sgd"  # from the schema: the recipe file does not state it


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match=r"'train.lr_rate' does not exist.*did you mean 'train.lr'"):
        load_recipe(["train.lr_rate=0.1"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError, match=r"'train.epochs' got 'many'"):
        load_recipe(["train.epochs=many"])


def test_bad_choice_lists_choices():
    with pytest.raises(UserError, match=r"'data.name' is 'imagenet' but must be one of: cub, cars"):
        load_recipe(["data.name=imagenet"])


def test_unknown_recipe_lists_recipes():
    with pytest.raises(UserError, match=r"recipe 'cub_basline' does not exist; did you mean 'cub_baseline'.*known recipes"):
        load_recipe(["recipe=cub_basline"])


def test_saved_recipe_repeats_the_run(tmp_path):
    cfg = load_recipe(["recipe=cub_baseline", "train.lr=0.123"])
    path = tmp_path / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    again = load_recipe([f"recipe={path}"])
    assert again == cfg


@pytest.mark.parametrize("args,needle", [
    (["train.lr_rate=1"], "did you mean 'train.lr'"),
    (["recipe=nope"], "known recipes"),
    (["train.batch_size=two"], "train.batch_size"),
    (["oops"], "key=value"),
])
def test_cli_errors_are_one_sentence_and_exit_2(args, needle):
    proc = run_script("train.py", *args, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
