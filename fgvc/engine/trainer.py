"""The one training loop. Accelerate does placement, precision, accumulation and distribution.

    recipe -> run folder, data, model, loss, optimizer, schedule -> for each epoch:
        train one epoch -> validate (model and EMA) -> keep the best by validation top-1
        -> checkpoint (atomically) -> log
    -> the best weights are evaluated once on the test split -> metrics.json
"""

from __future__ import annotations

from dataclasses import dataclass
import json
import math
import os
import time
from pathlib import Path

import timm
import timm.scheduler
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from fgvc.config import flatten
from fgvc.data.build import DataSplits, build_datasets, make_loader, read_index
from fgvc.engine.checkpoint import TrainState, load_extras, save_checkpoint, truncate_log
from fgvc.engine.losses import build_criterion
from fgvc.engine.metrics import predict, split_metrics
from fgvc.engine.optim import build_optimizer
from fgvc.engine.speed import apply_speed_switches
from fgvc.engine.runs import (atomic_write_text, check_run_dir, model_meta, prepare_run_dir, resolve_resume,
                              save_weights)
from fgvc.errors import RunError
from fgvc.models.build import build_model, data_backbone, mean_std, model_input

MULTI_OUTPUT_ARCHS = ("racnn", "dcn")  # some parameters sit out some steps: DDP must allow it
KILL_AFTER_EPOCH_ENV = "FGVC_KILL_AFTER_EPOCH"  # tests simulate `kill -9` at an epoch boundary
KILLED_EXIT = 137


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
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    train_loader: DataLoader
    val_loader: DataLoader | None
    state: TrainState
    selected: str  # "ema" or "model": whose weights are validated, kept and tested


def make_accelerator(cfg: DictConfig) -> Accelerator:
    t = cfg.train
    return Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.model.arch in MULTI_OUTPUT_ARCHS)],
        log_with="tensorboard" if t.tensorboard else None, project_dir=cfg.output_dir)


def start_run(cfg: DictConfig, accelerator: Accelerator, console: Console) -> Run:
    """Data, model, loss, optimizer and schedule; the run folder (made only once data and model are
    known to be fine); the checkpoint to continue, if any."""
    action = check_run_dir(cfg)  # every process decides the same, before any writes
    t = cfg.train
    with accelerator.main_process_first():  # the synthetic set is generated once
        index = read_index(cfg.data)
    model = apply_speed_switches(build_model(cfg.model, index.num_classes, cfg.data.image_size),
                                 t.channels_last, t.compile, t.grad_checkpointing)
    mean, std = mean_std(data_backbone(cfg.model))
    data = build_datasets(cfg.data, cfg.seed, mean, std, index=index)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_run_dir(cfg, action)
        atomic_write_text(out / "model.json", json.dumps(
            model_meta(cfg, index.class_names, index.part_names, mean, std), indent=1))
    accelerator.wait_for_everyone()
    mixup = None
    if t.mixup or t.cutmix:
        mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                      num_classes=index.num_classes)
    train_loader = make_loader(data.train, t.batch_size, cfg.data.num_workers, True, drop_last=mixup is not None)
    val_loader = make_loader(data.val, t.batch_size, cfg.data.num_workers, False) if data.val else None
    updates_per_epoch = max(1, math.ceil(len(train_loader) / accelerator.num_processes / t.grad_accum_steps))
    optimizer = build_optimizer(model, t)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=t.scheduler, num_epochs=t.epochs, warmup_epochs=t.warmup_epochs, min_lr=t.min_lr,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    criterion = build_criterion(cfg, updates_per_epoch)
    if hasattr(criterion, "bind"):  # RA-CNN: the model switches phase on its loss's schedule
        criterion.bind(model)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    raw = accelerator.unwrap_model(model)
    ema = ModelEmaV3(raw, decay=t.ema_decay, use_warmup=t.ema_warmup) if t.ema else None  # after prepare: on its device
    state = TrainState()
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # model, optimizer, RNG: safetensors / weights_only
        load_extras(resume_from, state, scheduler, ema)
        if accelerator.is_main_process:
            truncate_log(out / "metrics.jsonl", state.epoch)
        console.print(f"resumed from {resume_from} (epoch {state.epoch})")
    if t.tensorboard:
        flat = {k: v for k, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()
                if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("tensorboard", config=flat)
    return Run(accelerator, out, data, index.num_classes, model, raw, optimizer, scheduler, criterion, ema, mixup,
               train_loader, val_loader, state, "ema" if ema is not None else "model")


def train(cfg: DictConfig) -> dict:
    """Train the recipe; returns (and writes to metrics.json) the selected weights' val and test metrics."""
    t = cfg.train
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    console = Console(quiet=not accelerator.is_main_process)
    r = start_run(cfg, accelerator, console)

    for epoch in range(r.state.epoch, t.epochs):
        start = time.perf_counter()
        r.train_loader.set_epoch(epoch)
        r.data.train.set_epoch(epoch)  # augmentation = f(seed, epoch, sample)
        losses = train_one_epoch(r.model, r.raw, r.criterion, r.optimizer, r.scheduler, r.ema, r.mixup,
                                 r.train_loader, accelerator, r.state, epoch, t)
        seconds = time.perf_counter() - start
        r.state.train_time += seconds
        row = {"epoch": epoch + 1, "lr": r.optimizer.param_groups[0]["lr"], **losses, "train_seconds": seconds,
               "train_images": len(r.data.train)}
        row |= validate_and_keep(r, epoch)
        if accelerator.is_main_process:  # logged before the checkpoint; a resume drops lines past it
            with open(r.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            console.print(epoch_table(row))
        if t.tensorboard:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
        save_checkpoint(accelerator, r.out, r.state, r.scheduler, r.ema, t.keep_checkpoints)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(r.state.epoch):  # tests: a kill right after a save
            os._exit(KILLED_EXIT)

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
    row, scores = {}, {}
    for name, net in candidates.items():
        if r.val_loader is not None:
            m = split_metrics(predict(net, r.val_loader, r.accelerator), r.num_classes)
            row |= {f"val_{name}_{k}" if name != "model" else f"val_{k}": v for k, v in m.items()}
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
               "train_time_s": round(r.state.train_time, 2)}
    results["val"] = (split_metrics(predict(r.model, r.val_loader, r.accelerator), r.num_classes)
                      if r.val_loader is not None else {"num_samples": 0})
    test_loader = r.accelerator.prepare(make_loader(r.data.test, cfg.train.batch_size, cfg.data.num_workers, False))
    results["test"] = split_metrics(predict(r.model, test_loader, r.accelerator), r.num_classes)
    return results


def train_one_epoch(model, raw, criterion, optimizer, scheduler, ema, mixup, loader, accelerator, state,
                    epoch: int, t: DictConfig) -> dict[str, float]:
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    with Progress(TextColumn(f"epoch {epoch + 1}/{t.epochs}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[loss]}"),
                  disable=not accelerator.is_local_main_process, transient=True) as bar:
        task = bar.add_task("train", total=len(loader), loss="")
        for batch in loader:
            images, target = model_input(raw, batch["image"]), batch["label"]  # uint8 -> normalised, on device
            if mixup is not None:
                images, target = mixup(images, target)
            with accelerator.accumulate(model):
                if hasattr(raw, "step_schedule"):
                    raw.step_schedule(state.update, epoch)
                out = model(images)
                terms = criterion(out, target, update=state.update, epoch=epoch)
                accelerator.backward(terms["loss"])
                if t.clip_grad and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                state.update += 1
                scheduler.step_update(num_updates=state.update)
                if ema is not None:
                    ema.update(raw, step=state.update)
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
