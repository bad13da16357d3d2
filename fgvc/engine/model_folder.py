"""The exported model folder (Hugging Face Hub layout), written by fgvc/export.py:

    OUT/model.safetensors   the selected weights; for a plain timm classifier under timm's own names
    OUT/config.json         architecture, num_classes, label_names (the class names), input_size, mean, std;
                            for a plain classifier timm's `pretrained_cfg`, so timm alone builds and loads it;
                            under "fgvc" what fgvc rebuilds the model from (the run folder's model.json)
    OUT/recipe.yaml         the resolved recipe of the run
    OUT/README.md           the model card

`load_run` (fgvc/engine/runs.py) reads this layout as well as a run folder, through `read_model_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path

from fgvc.models.weights import read_safetensors
from torch import Tensor

CONFIG_FILE = "config.json"
TIMM_PREFIX = "net."  # fgvc's Classifier keeps its timm network as `net`
FGVC_KEY = "fgvc"  # config.json section that fgvc rebuilds the model from


def is_model_folder(path: Path) -> bool:
    """An exported folder: config.json with an fgvc section, and no run folder's model.json."""
    config = path / CONFIG_FILE
    if (path / "model.json").is_file() or not config.is_file():
        return False
    try:
        return FGVC_KEY in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def timm_loadable(model_section: dict) -> bool:
    """A plain timm classifier (no fgvc attention, zoom or coarse/fine path): timm alone rebuilds it."""
    return model_section["arch"] == "classifier" and model_section["attention"]["type"] == "none"


def exported_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """fgvc's state dict -> the folder's: `prefix` removed (timm's names for a plain classifier)."""
    if not prefix:
        return state
    return {k[len(prefix):]: v for k, v in state.items()}


def read_model_folder(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """(model.json-like meta, fgvc state dict) of an exported folder; weights via safetensors only."""
    meta = json.loads((path / CONFIG_FILE).read_text())[FGVC_KEY]
    state = read_safetensors(path / "model.safetensors", "export the run again")
    prefix = meta.get("state_prefix", "")
    return meta, {prefix + k: v for k, v in state.items()}
