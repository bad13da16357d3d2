"""Checkpoints: Accelerate's state plus fgvc's counters (JSON) and EMA weights (safetensors), written
atomically so that a kill at any moment leaves the previous checkpoint intact."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError

from fgvc.engine.guard import drop_set_aside
from fgvc.engine.runs import (CHECKPOINT_PREFIX, atomic_write_text, checkpoints, read_log, save_weights,
                              write_errors)
from fgvc.errors import DataError
from fgvc.models.weights import read_safetensors


class TrainState:
    """Counters checkpointed with the model: where the run is and which epoch is best so far."""

    def __init__(self) -> None:
        self.epoch, self.update, self.best_top1, self.best_epoch, self.train_time = 0, 0, -1.0, -1, 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def truncate_log(path: Path, epochs_done: int) -> None:
    """Keep the lines of the epochs a resumed checkpoint holds (a kill may have logged one more)."""
    if path.is_file():
        rows = [row for row in read_log(path) if row["epoch"] <= epochs_done]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


STATE_FILE, EMA_FILE = "fgvc_state.json", "ema.safetensors"


def save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, scheduler, ema, keep: int) -> None:
    """Accelerate's state (model, optimizer, RNG) plus ours (counters and schedule as JSON, EMA as
    safetensors: nothing that loads by unpickling) into a temporary folder, renamed into place once
    complete, so a kill at any moment leaves the previous checkpoint intact. Called on every process.
    A failed write (a full disk) stops the run with one sentence and leaves the previous checkpoint."""
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.epoch:04d}"
    tmp = out / "checkpoints" / f".tmp_{CHECKPOINT_PREFIX}{state.epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with write_errors(final, tmp):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with write_errors(final, tmp):
            if ema is not None:
                save_weights(ema.module, tmp / EMA_FILE)
            extras = {"train": state.state_dict(), "scheduler": scheduler.state_dict()}
            (tmp / STATE_FILE).write_text(json.dumps(extras))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        drop_set_aside(out)  # overwrite=true: the new run has started, the one it replaces can go
        for old in checkpoints(out)[:-max(1, keep)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, folder: Path) -> None:
    """Accelerate's state (model, optimizer, RNG); a damaged checkpoint is one sentence."""
    try:
        accelerator.load_state(str(folder))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise DataError(f"checkpoint '{folder}' is damaged ({reason}); resume from an earlier one with "
                        f"train.resume={folder.parent}/{CHECKPOINT_PREFIX}NNNN.") from None


def load_extras(folder: Path, state: TrainState, scheduler, ema) -> None:
    """fgvc's counters, the schedule (None: keep the schedule just built, the recipe changed it) and EMA."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
        state.load_state_dict(saved["train"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"checkpoint '{folder}' is damaged ({STATE_FILE}: {err.__class__.__name__}); resume from an "
                        f"earlier one with train.resume={folder.parent}/{CHECKPOINT_PREFIX}NNNN.") from None
    if ema is not None:
        ema.module.load_state_dict(read_safetensors(folder / EMA_FILE, f"resume from an earlier checkpoint than "
                                                                       f"'{folder}'"))
