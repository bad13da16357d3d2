"""Recipes: loading, overrides, and every user error as one sentence with exit status 2."""

from __future__ import annotations

import re
from dataclasses import MISSING, is_dataclass

import pytest
from conftest import run_script
from omegaconf import OmegaConf

from fgvc.config import Recipe, _schema_fields, available_recipes, flatten, load_recipe
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
    assert cfg.recipe == name and "base" not in cfg


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


def test_a_recipe_states_only_what_differs_from_its_base():
    base, cbam = load_recipe(["recipe=cub_baseline"]), load_recipe(["recipe=cub_cbam"])
    assert cbam.model.attention.type == "cbam" and cbam.model.attention.placement == "block"
    cbam.model.attention = base.model.attention
    cbam.recipe = base.recipe
    cbam.output_dir = base.output_dir
    assert cbam == base  # everything else is cub_baseline's
    cars = load_recipe(["recipe=cars_cbam"])  # a chain: cars_cbam -> cars_baseline -> cub_baseline
    assert (cars.data.name, cars.data.root) == ("cars", "data/stanford_cars")
    assert cars.train == base.train and cars.data.image_size == base.data.image_size


@pytest.fixture
def recipes_dir(tmp_path, monkeypatch):
    import fgvc.config

    monkeypatch.setattr(fgvc.config, "RECIPES_DIR", tmp_path)
    return tmp_path


def test_bases_chain_and_nearer_recipes_win(recipes_dir):
    (recipes_dir / "a.yaml").write_text("train: {lr: 0.5, epochs: 7}\ndata: {image_size: 40}\n")
    (recipes_dir / "b.yaml").write_text("base: a\ntrain: {lr: 0.25}\n")
    (recipes_dir / "c.yaml").write_text("base: b\ndata: {image_size: 48}\n")
    cfg = load_recipe(["recipe=c", "train.epochs=9"])
    assert (cfg.train.lr, cfg.data.image_size, cfg.train.epochs, cfg.recipe) == (0.25, 48, 9, "c")
    assert "base" not in cfg  # consumed: the saved recipe.yaml is the resolved one


def test_a_cycle_of_bases_is_one_sentence(recipes_dir):
    (recipes_dir / "a.yaml").write_text("base: b\n")
    (recipes_dir / "b.yaml").write_text("base: a\n")
    with pytest.raises(UserError, match=r"recipe bases form a cycle \(a -> b -> a\)"):
        load_recipe(["recipe=a"])
    (recipes_dir / "c.yaml").write_text("base: nope\n")
    with pytest.raises(UserError, match=r"recipe 'nope' \(the base of recipes/c.yaml\) does not exist"):
        load_recipe(["recipe=c"])


@pytest.mark.parametrize("args,needle", [
    (["model.zoom.scales=2"], "'model.zoom.scales' is set but model.arch=classifier ignores it"),
    (["model.arch=racnn", "model.attention.type=se"], "'model.attention.type' is set but model.arch=racnn"),
    (["model.arch=dcn", "model.drop_rate=0.2"], "'model.drop_rate' is set but model.arch=dcn"),
    (["model.arch=classifier", "train.dcn.hint_weight=2.0"], "'train.dcn.hint_weight' is set"),
    (["model.attention.type=sqeeze"], "'model.attention.type' is 'sqeeze' but must be one of: none, se, cbam"),
    (["model.attention.type=stn", "model.attention.placement=block"], "set model.attention.placement=stage"),
    (["model.arch=racnn", "model.zoom.scales=4"], "'model.zoom.scales' is '4' but must be one of: 2, 3"),
    (["model.arch=racnn", "model.zoom.mask_steepness=0"], "model.zoom.mask_steepness is 0.0"),
    (["model.arch=dcn", "model.dcn.top_k=-1"], "model.dcn.top_k must be at least 0"),
])
def test_one_validation_step_knows_each_arch_and_range(args, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        load_recipe(args)


def test_keys_every_arch_reads_are_accepted_for_each():
    for arch in ("classifier", "racnn", "dcn"):
        cfg = load_recipe([f"model.arch={arch}", "model.weights=w.safetensors", "model.pretrained=true"])
        assert cfg.model.weights == "w.safetensors"


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


def _leaf_keys() -> list[str]:
    return list(flatten(OmegaConf.to_container(OmegaConf.structured(Recipe))))


def test_every_recipe_key_has_one_line_of_help():
    missing = [dotted for dotted, f in _schema_fields(Recipe)
               if not (f.default_factory is not MISSING and is_dataclass(f.default_factory))
               and not f.metadata.get("help", "").strip()]
    assert not missing, (
        f"recipe keys without help: {', '.join(missing)}. Declare each with its meaning in the schema "
        "(fgvc/config.py, or the spec its section comes from), e.g. `lr: float = key(0.1, \"peak learning rate\")`, "
        "`fuse: str = one_of(\"features\", (\"features\", \"scores\"), \"what the scales share\")` or "
        "`only_for(\"racnn\", default=..., help=\"...\")`; a trailing `# comment` is not read by `fgvc-train --keys`.")


def test_key_listing_shows_every_key_with_its_facts(capsys):
    from fgvc.train import main

    assert main(["--keys"]) == 0
    listing = capsys.readouterr().out
    for dotted in _leaf_keys():
        assert f"  {dotted}  (" in listing, dotted
    line = next(ln for ln in listing.splitlines() if ln.startswith("  model.dcn.saliency  ("))
    assert "default cam" in line and "one of entropy, cam" in line and "model.arch dcn" in line
    line = next(ln for ln in listing.splitlines() if ln.startswith("  train.zoom.cls_steps  ("))
    assert "int" in line and "default 20" in line and "model.arch racnn" in line  # the section's arch
    assert "data.synthetic.hidden  (float; default 0.0; 0 to 1)" in listing


@pytest.mark.parametrize("spec, section", [("SyntheticSpec", "synthetic"), ("FractalSpec", "fractal")])
def test_a_generator_section_is_its_spec(spec, section):
    import dataclasses

    from fgvc.data import fractal, synthetic

    spec_cls = getattr(synthetic if spec == "SyntheticSpec" else fractal, spec)
    schema = OmegaConf.structured(Recipe).data[section]
    assert spec_cls(**OmegaConf.to_container(schema)) == spec_cls()  # the same defaults, declared once
    assert list(schema) == [f.name for f in dataclasses.fields(spec_cls)]
    cfg = load_recipe([f"data.{section}.seed=7"])
    built = spec_cls(**OmegaConf.to_container(cfg.data[section]))  # what fgvc/data/build.py does
    assert built.seed == 7
