"""The run folder (a contract other tools read):

    output_dir/recipe.yaml        the resolved recipe; `python fgvc/train.py recipe=DIR/recipe.yaml` repeats it
    output_dir/model.json         what rebuilds the model: model section, classes, parts, input size, mean/std
    output_dir/model.safetensors  the selected weights (best validation epoch)
    output_dir/metrics.jsonl      one line per epoch
    output_dir/metrics.json       {"val": {...}, "test": {...}, ...} once the run has finished
    output_dir/checkpoints/       Accelerate states, epoch_NNNN, the last `train.keep_checkpoints`
    output_dir/.lock              held by the run's main process (fgvc/engine/guard.py)
    output_dir/.replaced_run/     overwrite=true: the old run, until the new one's first checkpoint

Its lifecycle in a training run, in order: `check_run_dir` (every process: new, resume or
overwrite, before anything is built), `claim_run_dir` (main process: lock, decide again under the
lock, set an old run aside, write recipe.yaml), the first checkpoint drops a set-aside run
(fgvc/engine/checkpoint.py) and a run that fails before it puts the old run back
(`guard.replaced_run_kept_until_started`, around `train` in fgvc/train.py).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from fgvc.config import load_recipe, to_yaml
from fgvc.engine.guard import SET_ASIDE, check_replaceable, lock_run_dir, set_aside_old_run
from fgvc.engine.model_folder import CONFIG_FILE, is_model_folder, read_model_folder
from fgvc.errors import DataError, RunError, UserError
from fgvc.models.build import build_model
from fgvc.models.weights import read_safetensors
from fgvc.safe_io import check_names, make_folder, write_text, writing

CHECKPOINT_PREFIX = "epoch_"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a kill leaves the old file intact (fgvc/safe_io.py)."""
    write_text(path, text)


def save_weights(model: nn.Module, path: Path) -> None:
    """Weights as safetensors, written beside `path` and renamed: a kill or a full disk leaves the old file."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with writing(path) as tmp, write_errors(path, tmp):
        save_file(state, str(tmp))


@contextmanager
def write_errors(what: Path, tmp: Path | None = None) -> Iterator[None]:
    """A write that fails (full disk, quota, read-only folder) becomes one sentence (exit 4); the
    half-written temporary folder is removed."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)
        reason = (str(err).strip().splitlines() or [err.__class__.__name__])[-1]
        raise RunError(f"could not write '{what}' ({reason}); free space on its disk (or choose another "
                       "output_dir), then continue from the last checkpoint with train.resume=auto.") from None


def check_run_dir(cfg: DictConfig) -> str:
    """What to do with output_dir: 'new', 'resume' or 'overwrite'. Read-only, so every process can
    call it before any of them writes; raises UserError where the user must decide. The main
    process asks again once it holds the folder's lock (fgvc/engine/guard.py)."""
    out = Path(cfg.output_dir)
    finished = (out / "metrics.json").is_file()
    started = ((out / "metrics.jsonl").is_file() or bool(checkpoints(out)) or (out / SET_ASIDE).is_dir()
               if out.is_dir() else False)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir '{out}' is a file; choose a folder.")
    explicit = cfg.train.resume not in ("", "auto")
    if explicit and not _inside(Path(cfg.train.resume), out / "checkpoints"):
        raise UserError(f"train.resume '{cfg.train.resume}' is not a checkpoint of the run in output_dir '{out}'; "
                        f"resume a run in its own folder (output_dir=<the folder holding {cfg.train.resume}'s "
                        "checkpoints/>), or copy that folder and resume the copy.")
    if cfg.overwrite:
        if explicit:
            raise UserError("overwrite=true would replace the run whose checkpoint train.resume names; "
                            "drop one of the two.")
        if started or finished:
            check_replaceable(out)
            return "overwrite"
        return "new"
    if cfg.train.resume:
        if finished:
            raise UserError(f"run folder '{out}' holds a finished run, and resuming it would replace its metrics.json "
                            "and model.safetensors; copy the folder without metrics.json and resume the copy, pass "
                            "overwrite=true to train it again, or choose another output_dir.")
        return "resume"
    if finished:
        raise UserError(f"run folder '{out}' holds a finished run; pass overwrite=true to replace it "
                        "or choose another output_dir.")
    if started:
        raise UserError(f"run folder '{out}' holds an unfinished run; continue it with train.resume=auto, "
                        "replace it with overwrite=true, or choose another output_dir.")
    return "new"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def claim_run_dir(cfg: DictConfig, action: str) -> Path:
    """Main process only: hold the folder's lock until the process ends, decide again under it
    (another run may have written the folder since `check_run_dir`), set an old run aside
    (overwrite=true), create the folder and save the resolved recipe. `overwrite=true` is never
    saved: a repeated recipe must not delete anything."""
    out = Path(cfg.output_dir)
    lock_run_dir(out)
    check_run_dir(cfg)
    if action == "overwrite" and out.is_dir():
        set_aside_old_run(out)
    make_folder(out / "checkpoints")
    saved = cfg.copy()
    saved.overwrite = False
    atomic_write_text(out / "recipe.yaml", to_yaml(saved))
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


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of `model` in `state` with its shape, and nothing else; else one sentence."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (wrong + missing + unexpected)[0]
        shapes = (f": '{first}' is {tuple(state[first].shape)} in the file but {tuple(own[first].shape)} in the model"
                  if wrong else f" (first: '{first}')")
        raise DataError(f"{what} ({len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} "
                        f"differently shaped tensors{shapes}); retrain or restore the run folder.")


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
    meta_file = run_dir / (CONFIG_FILE if exported else "model.json")
    try:
        meta, state = read_model_folder(run_dir) if exported else (json.loads(meta_file.read_text()), None)
        model_cfg = OmegaConf.merge(cfg.model, meta["model"])
        num_classes, image_size = int(meta["num_classes"]), int(meta["image_size"])
    except (ValueError, KeyError, TypeError, OmegaConfBaseException) as err:
        raise DataError(f"'{meta_file}' is damaged ({err.__class__.__name__}: {err}); restore it from a "
                        "copy of the run folder.") from None
    model_cfg.pretrained, model_cfg.weights = False, ""  # the run's own weights follow
    model = build_model(model_cfg, num_classes, image_size)
    fix = "restore it from a copy of the run folder or retrain"
    if state is None:
        state = read_safetensors(run_dir / "model.safetensors", fix)
    check_fits(model, state, f"'{run_dir}/model.safetensors' does not fit the model in {meta_file.name}")
    model.load_state_dict(state)
    model.to(device).eval()
    class_names = check_names(meta.get("class_names"), num_classes, "class", meta_file)
    part_names = check_names(meta.get("part_names", []), len(meta.get("part_names") or []), "part", meta_file)
    return RunInfo(run_dir, cfg, model, class_names, part_names,
                   tuple(meta["mean"]), tuple(meta["std"]), meta["image_size"])


def read_log(path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (none if it is missing), each a mapping with a whole `epoch`;
    a line that is not one, as a hand edit may leave, is one sentence (exit 3) naming the line."""
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)
        except ValueError:
            ok = False
        if not ok:
            raise DataError(f"{path}:{lineno} is not a metrics line ({{\"epoch\": N, ...}}); delete that line or restore "
                            "the file from a copy of the run folder.")
        rows.append(row)
    return rows
