"""The run folder (a contract other tools read):

    output_dir/recipe.yaml        the resolved recipe; `python fgvc/train.py recipe=DIR/recipe.yaml` repeats it
    output_dir/model.json         what rebuilds the model: model section, classes, parts, input size, mean/std
    output_dir/model.safetensors  the selected weights (best validation epoch)
    output_dir/metrics.jsonl      one line per epoch
    output_dir/metrics.json       {"val": {...}, "test": {...}, ...} once the run has finished
    output_dir/checkpoints/       Accelerate states, epoch_NNNN, the last `train.keep_checkpoints`
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from fgvc.config import load_recipe, to_yaml
from fgvc.engine.model_folder import CONFIG_FILE, is_model_folder, read_model_folder
from fgvc.errors import UserError
from fgvc.models.build import build_model

CHECKPOINT_PREFIX = "epoch_"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a kill leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, path)


def check_run_dir(cfg: DictConfig) -> str:
    """What to do with output_dir: 'new', 'resume' or 'overwrite'. Read-only, so every process can
    call it before any of them writes; raises UserError where the user must decide."""
    out = Path(cfg.output_dir)
    finished = (out / "metrics.json").is_file()
    started = (out / "metrics.jsonl").is_file() or bool(checkpoints(out)) if out.is_dir() else False
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; choose a folder.")
    if cfg.overwrite:
        return "overwrite" if started else "new"
    if cfg.train.resume:
        if finished and cfg.train.resume == "auto":
            raise UserError(f"run folder '{out}' holds a finished run; pass overwrite=true to train it again "
                            "or choose another output_dir.")
        return "resume"
    if finished:
        raise UserError(f"run folder '{out}' holds a finished run; pass overwrite=true to replace it "
                        "or choose another output_dir.")
    if started:
        raise UserError(f"run folder '{out}' holds an unfinished run; continue it with train.resume=auto, "
                        "replace it with overwrite=true, or choose another output_dir.")
    return "new"


def prepare_run_dir(cfg: DictConfig, action: str) -> Path:
    """Create the folder (main process only) and save the resolved recipe."""
    out = Path(cfg.output_dir)
    if action == "overwrite" and out.is_dir():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", to_yaml(cfg))
    return out


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one has a temporary name)."""
    return sorted(p for p in (out / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())


def resolve_resume(cfg: DictConfig) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        found = checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None  # nothing saved yet: start from the beginning
    path = Path(cfg.train.resume)
    if not (path / "fgvc_state.json").is_file():
        raise UserError(f"train.resume '{path}' is not a checkpoint folder; give one of "
                        f"{cfg.output_dir}/checkpoints/{CHECKPOINT_PREFIX}NNNN or train.resume=auto.")
    return path


@dataclass
class RunInfo:
    run_dir: Path
    cfg: DictConfig
    model: nn.Module
    class_names: list[str]
    part_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int


def model_meta(cfg: DictConfig, class_names: list[str], part_names: list[str], mean, std) -> dict:
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "num_classes": len(class_names),
            "class_names": class_names, "part_names": part_names, "image_size": cfg.data.image_size,
            "mean": list(mean), "std": list(std), "data": cfg.data.name}


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> RunInfo:
    """Rebuild a trained model from its run folder or from a folder fgvc/export.py wrote (weights
    via safetensors: no code unpickled)."""
    run_dir = Path(run_dir)
    exported = is_model_folder(run_dir)
    for name in ("recipe.yaml", CONFIG_FILE if exported else "model.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise UserError(f"'{run_dir}' is not a finished fgvc run folder: {name} is missing; "
                            "give the output_dir of a run made by fgvc/train.py or a folder made by fgvc/export.py.")
    cfg = load_recipe(recipe_file=run_dir / "recipe.yaml")
    if exported:
        meta, state = read_model_folder(run_dir)
    else:
        meta, state = json.loads((run_dir / "model.json").read_text()), load_file(str(run_dir / "model.safetensors"))
    model_cfg = OmegaConf.merge(cfg.model, meta["model"])
    model_cfg.pretrained, model_cfg.weights = False, ""  # the run's own weights follow
    model = build_model(model_cfg, meta["num_classes"], meta["image_size"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"'{run_dir}/model.safetensors' does not fit the model in model.json "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors); retrain or restore it.")
    model.to(device).eval()
    return RunInfo(run_dir, cfg, model, meta["class_names"], meta.get("part_names", []),
                   tuple(meta["mean"]), tuple(meta["std"]), meta["image_size"])
