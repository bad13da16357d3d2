"""The one training loop. Accelerate does placement, precision, accumulation and distribution.

    recipe -> run folder, data, model, loss, optimizer, schedule -> for each epoch:
        train one epoch -> validate (model and EMA) -> keep the best by validation top-1
        -> checkpoint (atomically) -> log
    -> the best weights are evaluated once on the test split -> metrics.json
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from fgvc.data.build import DataSplits, build_datasets, make_loader, read_index
from fgvc.engine.checkpoint import TrainState, load_checkpoint, load_extras, save_checkpoint, truncate_log
from fgvc.engine.guard import SCHEDULE_KEYS, SET_ASIDE, check_precision, check_resume, check_weights_finite
from fgvc.engine.losses import build_criterion, build_schedule
from fgvc.engine.metrics import predict, split_metrics
from fgvc.engine.optim import build_lr_scheduler, build_optimizer
from fgvc.engine.speed import apply_speed_switches
from fgvc.engine.runs import (atomic_write_text, check_run_dir, claim_run_dir, model_meta, resolve_resume,
                              save_weights)
from fgvc.engine.trackers import PROJECT_NAME, tracker_config, tracker_names
from fgvc.errors import RunError
from fgvc.safe_io import append_line
from fgvc.models.build import build_model, data_backbone, mean_std, model_input
from fgvc.models.cfvit import CfvitSchedule
from fgvc.models.dcn import DcnSchedule
from fgvc.models.zoom import ZoomSchedule

PARTLY_UNUSED_ARCHS = ("racnn", "dcn")  # some parameters sit out some steps: DDP must allow it
VAL_PREFIX = {"model": "val_", "ema": "val_ema_"}  # metrics.jsonl columns of each validated candidate


@dataclass
class Run:
    """Everything the epoch loop touches, built and (on resume) restored by `start_run`."""
    accelerator: Accelerator
    out: Path
    data: DataSplits
    num_classes: int
    model: torch.nn.Module  # prepared (wrapped) model
    raw: torch.nn.Module  # the same model unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: torch.nn.Module
    schedule: ZoomSchedule | DcnSchedule | CfvitSchedule | None  # the arch's phases or steps; asked before each forward
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    train_loader: DataLoader
    val_loader: DataLoader | None
    state: TrainState
    selected: str  # "ema" or "model": whose weights are validated, kept and tested


def make_accelerator(cfg: DictConfig) -> Accelerator:
    t = cfg.train
    log_with = tracker_names(t.log_with)  # [] for none; an unknown or missing tracker stops here
    return Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.model.arch in PARTLY_UNUSED_ARCHS)],
        log_with=log_with or None, project_dir=cfg.output_dir)


def start_run(cfg: DictConfig, accelerator: Accelerator, console: Console) -> Run:
    """Data, model, loss, optimizer and schedule, all built and checked before the run folder is
    touched; then, holding the folder's lock, the folder (fgvc/engine/runs.py); the checkpoint to
    continue, if any."""
    check_precision(cfg, accelerator.device)
    action = check_run_dir(cfg)  # every process decides the same, before any writes
    changed = check_resume(cfg) if action == "resume" else []
    resume_from = resolve_resume(cfg) if action == "resume" else None
    t = cfg.train
    with accelerator.main_process_first():  # the synthetic set is generated once
        index = read_index(cfg.data)
    model = apply_speed_switches(build_model(cfg.model, index.num_classes, cfg.data.image_size),
                                 t.channels_last, t.compile, t.grad_checkpointing)
    mean, std = mean_std(data_backbone(cfg.model))
    data = build_datasets(cfg.data, cfg.seed, mean, std, index=index)
    mixup = None
    if t.mixup or t.cutmix:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                      num_classes=index.num_classes)
    train_loader = make_loader(data.train, t.batch_size, cfg.data.num_workers, True, drop_last=mixup is not None)
    val_loader = make_loader(data.val, t.batch_size, cfg.data.num_workers, False) if data.val else None
    updates_per_epoch = max(1, math.ceil(len(train_loader) / accelerator.num_processes / t.grad_accum_steps))
    optimizer = build_optimizer(model, t)
    scheduler = build_lr_scheduler(optimizer, t, updates_per_epoch)
    criterion = build_criterion(cfg)
    schedule = build_schedule(cfg, updates_per_epoch)  # RA-CNN's phases; None for other archs
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        claim_run_dir(cfg, action)
        if action == "overwrite":
            console.print(f"the old run in {out} waits in {out / SET_ASIDE} until this run's first checkpoint")
        atomic_write_text(out / "model.json", json.dumps(
            model_meta(cfg, index.class_names, index.part_names, mean, std), indent=1))
    accelerator.wait_for_everyone()
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    raw = accelerator.unwrap_model(model)
    ema = ModelEmaV3(raw, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None  # after prepare: on its device
    state = TrainState()
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)  # model, optimizer, RNG: safetensors / weights_only
        rebuilt = [k for k in changed if k in SCHEDULE_KEYS]
        load_extras(resume_from, state, None if rebuilt else scheduler, ema)
        if rebuilt:  # the new schedule, from the update the checkpoint reached
            scheduler.step_update(num_updates=state.update)
        console.print(f"resumed from {resume_from} (epoch {state.epoch})"
                      + (f"; schedule rebuilt for {', '.join(rebuilt)}" if rebuilt else ""))
    if action == "resume" and accelerator.is_main_process:
        truncate_log(out / "metrics.jsonl", state.epoch)  # lines a kill left past the checkpoint
    if tracker_names(cfg.train.log_with):
        accelerator.init_trackers(PROJECT_NAME, config=tracker_config(cfg))
    return Run(accelerator, out, data, index.num_classes, model, raw, optimizer, scheduler, criterion, schedule, ema,
               mixup, train_loader, val_loader, state, "ema" if ema is not None else "model")


def train(cfg: DictConfig, after_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Train the recipe; returns (and writes to metrics.json) the selected weights' val and test metrics.
    `after_checkpoint(epoch)` runs after each epoch's checkpoint (tests use it to simulate a kill)."""
    t = cfg.train
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    console = Console(quiet=not accelerator.is_main_process)
    r = start_run(cfg, accelerator, console)

    for epoch in range(r.state.epoch, t.epochs):
        start = time.perf_counter()
        r.train_loader.set_epoch(epoch)
        r.data.train.set_epoch(epoch)  # augmentation = f(seed, epoch, sample)
        losses = train_one_epoch(r, epoch, t)
        seconds = time.perf_counter() - start
        r.state.train_time += seconds
        row = {"epoch": epoch + 1, "lr": r.optimizer.param_groups[0]["lr"], **losses, "train_seconds": seconds,
               "train_images": len(r.data.train)}
        row |= validate_and_keep(r, epoch)
        if accelerator.is_main_process:  # logged before the checkpoint; a resume drops lines past it
            append_line(r.out / "metrics.jsonl", json.dumps(row))
            console.print(epoch_table(row))
        if accelerator.trackers:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
        save_checkpoint(accelerator, r.out, r.state, r.scheduler, r.ema, t.keep_checkpoints)
        if after_checkpoint is not None:
            after_checkpoint(r.state.epoch)

    results = final_evaluation(r, cfg)
    if accelerator.is_main_process:
        atomic_write_text(r.out / "metrics.json", json.dumps(results, indent=1))
        console.print(f"[bold]test[/bold] top-1 {results['test']['top1']:.4f}  "
                      f"mean class acc {results['test']['mean_class_acc']:.4f}  "
                      f"({results['test']['num_samples']} images; best epoch {r.state.best_epoch}) -> {r.out}")
    accelerator.end_training()
    return results


def validate_and_keep(r: Run, epoch: int) -> dict:
    """Validate the model (and its EMA); save the selected weights when they are the best so far."""
    candidates = {"model": r.model} | ({"ema": r.ema.module} if r.ema is not None else {})
    check_weights_finite(candidates, r.accelerator, epoch)  # nothing non-finite is kept or checkpointed
    row, scores = {}, {}
    for name, net in candidates.items():
        if r.val_loader is not None:
            m = split_metrics(predict(net, r.val_loader, r.accelerator), r.num_classes)
            row |= {VAL_PREFIX[name] + k: v for k, v in m.items()}
            scores[name] = m["top1"]
    score = scores.get(r.selected, float(epoch))  # no validation split: the last epoch is kept
    if score > r.state.best_top1:
        r.state.best_top1, r.state.best_epoch = score, epoch + 1
        if r.accelerator.is_main_process:
            save_weights(r.accelerator.unwrap_model(candidates[r.selected]), r.out / "model.safetensors")
    r.state.epoch = epoch + 1
    row["best_epoch"] = r.state.best_epoch
    return row


def final_evaluation(r: Run, cfg: DictConfig) -> dict:
    """The selected weights, evaluated once on the test split (and again on validation)."""
    r.raw.load_state_dict(load_file(str(r.out / "model.safetensors")))
    results = {"best_epoch": r.state.best_epoch, "selected": r.selected,
               "train_time_s": round(r.state.train_time, 2), "cpu_threads": torch.get_num_threads()}
    results["val"] = (split_metrics(predict(r.model, r.val_loader, r.accelerator), r.num_classes)
                      if r.val_loader is not None else {"num_samples": 0})
    test_loader = r.accelerator.prepare(make_loader(r.data.test, cfg.train.batch_size, cfg.data.num_workers, False))
    results["test"] = split_metrics(predict(r.model, test_loader, r.accelerator), r.num_classes)
    return results


def train_one_epoch(r: Run, epoch: int, t: DictConfig) -> dict[str, float]:
    model, optimizer, accelerator, state, loader = r.model, r.optimizer, r.accelerator, r.state, r.train_loader
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    with Progress(TextColumn(f"epoch {epoch + 1}/{t.epochs}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[loss]}"),
                  disable=not accelerator.is_local_main_process, transient=True) as bar:
        task = bar.add_task("train", total=len(loader), loss="")
        for batch in loader:
            images, target = model_input(r.raw, batch["image"]), batch["label"]  # uint8 -> normalised, on device
            if r.mixup is not None:
                images, target = r.mixup(images, target)
            with accelerator.accumulate(model):
                phase = {} if r.schedule is None else {"phase": r.schedule.phase(state.update)}
                out = model(images, **phase)
                terms = r.criterion(out, target)
                accelerator.backward(terms["loss"])
                if t.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                state.update += 1
                r.scheduler.step_update(num_updates=state.update)
                if r.ema is not None:
                    r.ema.update(r.raw, step=state.update)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            steps += 1
            if steps % t.log_every == 0 or steps == len(loader):  # the only host syncs of the loop
                check_finite(sums["loss"], epoch)
                bar.update(task, completed=steps, loss=f"loss {sums['loss'].item() / steps:.4f}")
    means = {k: accelerator.reduce(v / max(steps, 1), reduction="mean") for k, v in sums.items()}
    check_finite(means["loss"], epoch)
    return {f"train_{k}": v.item() for k, v in means.items()}


def check_finite(loss: torch.Tensor, epoch: int) -> None:
    if not torch.isfinite(loss).all():
        raise RunError(f"the training loss became {loss.item()} in epoch {epoch + 1}; lower train.lr or set "
                       "train.clip_grad, then continue from the last good checkpoint with train.resume=auto.")


EPOCH_COLUMNS = {"lr": "lr", "train_loss": "train loss", "val_top1": "val top-1",
                 "val_mean_class_acc": "val mean-class", "val_ema_top1": "val top-1 (EMA)", "best_epoch": "best"}


def epoch_table(row: dict) -> Table:
    """The end-of-epoch summary: the few numbers worth reading; metrics.jsonl has all of them."""
    table = Table(title=f"epoch {row['epoch']}", title_justify="left")
    shown = [k for k in EPOCH_COLUMNS if k in row]
    for k in shown:
        table.add_column(EPOCH_COLUMNS[k], justify="right")
    table.add_row(*[f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in shown])
    return table
