"""What protects a run folder and the claim that a resumed run is the run it continues:

- one run at a time: the main process holds an exclusive lock on `output_dir/.lock` (fcntl.flock)
  from before its first write until it ends; a second run into the same folder stops with one
  sentence. The kernel drops the lock when the process dies, however it dies.
- `overwrite=true` replaces a run only once the new one is known to start: data, model, optimizer
  and schedule are built first; then the old run's files are moved into `output_dir/.replaced_run`,
  put back if the new run fails before its first checkpoint and deleted once that checkpoint is
  written. A folder holding files fgvc did not write is never replaced.
- a resume compares the recipe with the run's own `recipe.yaml` before anything is written; only
  the keys in `RESUMABLE` may differ, and changing a `SCHEDULE_KEYS` key rebuilds the learning-rate
  schedule from the update the checkpoint reached.
- weights with a NaN or an infinity are never saved (a loss can stay finite while a BatchNorm
  running variance overflows).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from fgvc.config import flatten, load_recipe
from fgvc.engine.trackers import PROJECT_NAME
from fgvc.errors import RunError, UserError
from fgvc.safe_io import check_target, make_folder, no_follow

LOCK_FILE = ".lock"
SET_ASIDE = ".replaced_run"  # overwrite=true: the old run waits here until the new one's first checkpoint
# Everything fgvc's tools write into a run folder; anything else is the user's and is never replaced.
FGVC_FILES = frozenset({"recipe.yaml", "model.json", "model.safetensors", "metrics.jsonl", "metrics.json",
                        "checkpoints", "tensorboard", "eval.json", "eval_val.json", "localization",
                        "backbone.safetensors", "report", "report.html", PROJECT_NAME, LOCK_FILE, SET_ASIDE})

# The learning-rate schedule is a function of these and the update count: on resume it is rebuilt.
SCHEDULE_KEYS = ("train.epochs", "train.lr", "train.min_lr", "train.warmup_epochs")
# Keys a resume may change; every other key must equal the run's own recipe.yaml.
RESUMABLE = frozenset({
    "recipe", "output_dir", "overwrite", "train.resume",  # where and how the run is started
    "train.keep_checkpoints", "train.log_with", "train.log_every",  # bookkeeping
    "data.root", "data.num_workers", "data.cache_mb",  # where and how the images are read, not which
    "train.clip_grad",  # read at every step
    *SCHEDULE_KEYS,
})

_held_locks: list = []  # open lock files: the locks last as long as the process
_set_aside: list[Path] = []  # the folders this process moved an old run into


def lock_run_dir(out: Path) -> None:
    """Hold `out/.lock` until this process ends (main process only); one sentence if another run holds it."""
    make_folder(out)
    check_target(out / LOCK_FILE)
    f = open(out / LOCK_FILE, "a+", opener=no_follow)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"run folder '{out}' is in use by another fgvc run ({holder}); wait for it to end "
                        "or choose another output_dir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_locks.append(f)


def foreign_files(out: Path) -> list[str]:
    """Names in `out` that no fgvc tool writes (atomic-write leftovers `.NAME.xxxx` count as fgvc's)."""
    def ours(name: str) -> bool:
        return name in FGVC_FILES or any(name.startswith(f".{known}.") for known in FGVC_FILES)

    return sorted(p.name for p in out.iterdir() if not ours(p.name)) if out.is_dir() else []


def check_replaceable(out: Path) -> None:
    """overwrite=true replaces fgvc's files only: refuse a folder that holds anything else."""
    foreign = foreign_files(out)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(f"run folder '{out}' holds '{foreign[0]}'{more}, which fgvc did not write; overwrite=true "
                        "would replace the whole folder, so move it out first or choose another output_dir.")


def set_aside_old_run(out: Path) -> Path:
    """Move the old run's files into out/.replaced_run (main process, under the lock). If that folder
    is already there, an earlier overwrite never reached its first checkpoint: what sits beside it is
    that attempt's partial run, which is dropped, and the older run stays set aside."""
    aside = out / SET_ASIDE
    entries = [p for p in out.iterdir() if p.name not in (LOCK_FILE, SET_ASIDE)]
    if aside.is_dir():
        for p in entries:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    else:
        aside.mkdir()
        for p in entries:
            p.rename(aside / p.name)
    _set_aside.append(aside)
    return aside


def drop_set_aside(out: Path) -> None:
    """The new run has its first checkpoint: the run it replaces can go."""
    aside = out / SET_ASIDE
    if aside.is_dir():
        shutil.rmtree(aside)


@contextmanager
def replaced_run_kept_until_started() -> Iterator[None]:
    """Put a set-aside run back if this process fails (any exception, Ctrl-C) before its new run's
    first checkpoint. After a kill -9 it stays in .replaced_run, named when the run started."""
    try:
        yield
    except BaseException:
        for aside in _set_aside:
            if aside.is_dir():
                out = aside.parent
                for p in out.iterdir():
                    if p.name not in (LOCK_FILE, SET_ASIDE):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
                for p in aside.iterdir():
                    p.rename(out / p.name)
                aside.rmdir()
                print(f"the run that overwrite=true was to replace is back in '{out}'.")
        raise


def check_resume(cfg: DictConfig) -> list[str]:
    """Before anything is written: every key outside `RESUMABLE` must equal the run's own
    recipe.yaml. Returns the resumable keys that changed."""
    saved_path = Path(cfg.output_dir) / "recipe.yaml"
    if not saved_path.is_file():
        return []
    saved = flatten(OmegaConf.to_container(load_recipe(recipe_file=saved_path), resolve=True))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    for key in changed:
        if key not in RESUMABLE:
            raise UserError(f"train.resume: recipe key '{key}' is {now.get(key)!r} but the run in '{cfg.output_dir}' "
                            f"was trained with {saved.get(key)!r}; resume with the run's value or start a new run "
                            "in another output_dir.")
    return [k for k in changed if k not in ("recipe", "output_dir", "overwrite", "train.resume")]


def check_precision(cfg: DictConfig, device: torch.device) -> None:
    """fp16 needs a GPU: on the CPU Accelerate would train in fp32 while recipe.yaml says fp16."""
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu":
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU and this run would train on the CPU; "
                        "use train.mixed_precision=bf16 or no.")


def check_weights_finite(nets: dict[str, torch.nn.Module], accelerator, epoch: int) -> None:
    """Stop (every process, exit 4) before weights holding a NaN or an infinity are saved."""
    tensors = {k.removeprefix("module.") + ("" if name == "model" else f" ({name})"): t for name, net in nets.items()
               for k, t in net.state_dict().items() if t.is_floating_point()}
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).any().float()  # one host sync
    if accelerator.reduce(bad, reduction="sum").item() == 0:
        return
    first = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), "on another process")
    raise RunError(f"after epoch {epoch + 1} the weights hold NaN or infinite values (first: '{first}') although "
                   "the loss stayed finite; nothing of this epoch was saved: lower train.lr or set train.clip_grad, "
                   "then continue from the last good checkpoint with train.resume=auto.")
