"""train.log_with (issue 18): Accelerate's tracker names, a flat typed config, the replaced key."""

from __future__ import annotations

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from conftest import run_script
from omegaconf import OmegaConf

from fgvc.config import flatten, load_recipe
from fgvc.engine.trackers import tracker_config, tracker_names
from fgvc.errors import UserError


def test_tracker_names_are_accelerates():
    assert tracker_names("") == []
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names(" tensorboard , tensorboard") == ["tensorboard", "tensorboard"]
    with pytest.raises(UserError, match="'tensorbord' is not one of Accelerate's trackers; use one of .*wandb"):
        tracker_names("tensorbord")


def test_a_tracker_that_is_not_installed_is_one_sentence():
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = sorted(set(LOGGER_TYPE_TO_CLASS) - installed)
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed here")
    with pytest.raises(UserError, match=f"needs the {missing[0]} package, which is not installed; pip install"):
        tracker_names(missing[0])


def test_tracker_config_is_flat_and_typed():
    cfg = load_recipe(["recipe=synth_cbam", "train.log_with=tensorboard"])
    flat = tracker_config(cfg)
    assert set(flat) == set(flatten(OmegaConf.to_container(cfg)))  # every leaf, nothing nested
    assert all(type(v) in (int, float, str, bool) for v in flat.values())
    assert flat["train.log_with"] == "tensorboard" and flat["data.image_size"] == cfg.data.image_size
    assert flat["data.crop_scale"] == "[0.6, 1.0]"
    assert flat["model.attention.stages"] == str(list(cfg.model.attention.stages))


def test_the_replaced_boolean_names_the_new_key(tmp_path):
    with pytest.raises(UserError, match="'train.tensorboard' was replaced .*write train.log_with=tensorboard"):
        load_recipe(["train.tensorboard=true"])
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  tensorboard: true\n")
    with pytest.raises(UserError, match="'train.tensorboard' was replaced"):
        load_recipe(recipe_file=old)


@pytest.mark.slow
def test_train_stops_before_work_on_an_unknown_tracker(tmp_path):
    proc = run_script("train.py", "train.log_with=tensorbord", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "is not one of Accelerate's trackers" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
