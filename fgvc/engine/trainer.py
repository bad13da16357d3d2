"""The one training loop. Accelerate does placement, precision, accumulation and distribution.

    recipe -> run folder, data, model, loss, optimizer, schedule -> for each epoch:
        train one epoch -> validate (model and EMA) -> keep the best by validation top-1
        -> checkpoint (atomically) -> log
    -> the best weights are evaluated once on the test split -> metrics.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import timm
import timm.optim
import timm.scheduler
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file
from timm.data import Mixup, resolve_data_config
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from fgvc.config import flatten
from fgvc.data.build import build_datasets, read_index
from fgvc.engine.losses import build_criterion
from fgvc.engine.metrics import predict, split_metrics
from fgvc.engine.runs import (CHECKPOINT_PREFIX, atomic_write_text, check_run_dir, checkpoints, model_meta,
                              prepare_run_dir, resolve_resume, save_weights)
from fgvc.errors import RunError
from fgvc.models.build import build_model

MULTI_OUTPUT_ARCHS = ("racnn", "dcn")  # some parameters sit out some steps: DDP must allow it
KILL_AFTER_EPOCH_ENV = "FGVC_KILL_AFTER_EPOCH"  # tests simulate `kill -9` at an epoch boundary
KILLED_EXIT = 137


class TrainState:
    """Counters checkpointed with the model: where the run is and which epoch is best so far."""

    def __init__(self) -> None:
        self.epoch, self.update, self.best_top1, self.best_epoch, self.train_time = 0, 0, -1.0, -1, 0.0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, new_lr_mult: float) -> list[dict]:
    """No decay on biases and norms; parameters that are not pretrained get lr * new_lr_mult."""
    pretrained = getattr(model, "pretrained_names", set())
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        new = bool(pretrained) and name not in pretrained
        no_decay = p.ndim <= 1
        g = groups.setdefault((new, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr": lr * (new_lr_mult if new else 1.0)})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, t: DictConfig) -> torch.optim.Optimizer:
    """timm's optimizer named by train.optimizer over `param_groups`."""
    return timm.optim.create_optimizer_v2(param_groups(model, t.lr, t.weight_decay, t.new_lr_mult), opt=t.optimizer,
                                          lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum)


def mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation of the timm model's pretrained configuration."""
    pcfg = timm.models.get_pretrained_cfg(backbone) or timm.models.get_pretrained_cfg(backbone.split(".")[0])
    cfg = resolve_data_config({}, pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    return tuple(cfg["mean"]), tuple(cfg["std"])


def data_backbone(model_cfg: DictConfig) -> str:
    return model_cfg.dcn.fine_backbone if model_cfg.arch == "dcn" else model_cfg.backbone


def make_loader(dataset, batch_size: int, workers: int, train: bool, drop_last: bool = False) -> DataLoader:
    """Workers live as long as the loader (augmentation is seeded per sample and epoch, see
    fgvc/data/dataset.py), so an epoch pays neither their start nor a cold image cache."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0, pin_memory=False)


def train(cfg: DictConfig) -> dict:
    action = check_run_dir(cfg)  # every process decides the same, before any writes
    t = cfg.train
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.model.arch in MULTI_OUTPUT_ARCHS)],
        log_with="tensorboard" if t.tensorboard else None, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    console = Console(quiet=not accelerator.is_main_process)
    with accelerator.main_process_first():  # the synthetic set is generated once
        index = read_index(cfg.data)
    model = build_model(cfg.model, index.num_classes, cfg.data.image_size)
    mean, std = mean_std(data_backbone(cfg.model))
    data = build_datasets(cfg.data, cfg.seed, mean, std, index=index)
    # the run folder is made only once data and model are known to be fine
    if accelerator.is_main_process:
        prepare_run_dir(cfg, action)
    accelerator.wait_for_everyone()
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        atomic_write_text(out / "model.json", json.dumps(
            model_meta(cfg, index.class_names, index.part_names, mean, std), indent=1))
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
    ema = ModelEmaV3(raw, decay=t.ema_decay) if t.ema else None  # after prepare: on the model's device
    selected = "ema" if ema is not None else "model"  # whose weights are validated, kept and tested
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

    for epoch in range(state.epoch, t.epochs):
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        data.train.set_epoch(epoch)  # augmentation = f(seed, epoch, sample)
        losses = train_one_epoch(model, raw, criterion, optimizer, scheduler, ema, mixup, train_loader,
                                 accelerator, state, epoch, t)
        seconds = time.perf_counter() - start
        state.train_time += seconds
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **losses, "train_seconds": seconds,
               "train_images": len(data.train)}
        candidates = {"model": model} | ({"ema": ema.module} if ema is not None else {})
        scores = {}
        for name, net in candidates.items():
            if val_loader is not None:
                m = split_metrics(predict(net, val_loader, accelerator), index.num_classes)
                row |= {f"val_{name}_{k}" if name != "model" else f"val_{k}": v for k, v in m.items()}
                scores[name] = m["top1"]
        score = scores.get(selected, float(epoch))  # no validation split: the last epoch is kept
        if score > state.best_top1:
            state.best_top1, state.best_epoch = score, epoch + 1
            if accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(candidates[selected]), out / "model.safetensors")
        state.epoch = epoch + 1
        row["best_epoch"] = state.best_epoch
        if accelerator.is_main_process:  # logged before the checkpoint; a resume drops lines past it
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            console.print(epoch_table(row))
        if t.tensorboard:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=epoch + 1)
        save_checkpoint(accelerator, out, state, scheduler, ema, t.keep_checkpoints)
        if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(state.epoch):  # tests: a kill right after a save
            os._exit(KILLED_EXIT)

    # the selected weights, evaluated once on the test split
    raw.load_state_dict(load_file(str(out / "model.safetensors")))
    results = {"best_epoch": state.best_epoch, "selected": selected,
               "train_time_s": round(state.train_time, 2), "cpu_threads": torch.get_num_threads()}
    results["val"] = (split_metrics(predict(model, val_loader, accelerator), index.num_classes)
                      if val_loader is not None else {"num_samples": 0})
    test_loader = accelerator.prepare(make_loader(data.test, t.batch_size, cfg.data.num_workers, False))
    results["test"] = split_metrics(predict(model, test_loader, accelerator), index.num_classes)
    if accelerator.is_main_process:
        atomic_write_text(out / "metrics.json", json.dumps(results, indent=1))
        console.print(f"[bold]test[/bold] top-1 {results['test']['top1']:.4f}  "
                      f"mean class acc {results['test']['mean_class_acc']:.4f}  "
                      f"({results['test']['num_samples']} images; best epoch {state.best_epoch}) -> {out}")
    accelerator.end_training()
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
            images, target = batch["image"], batch["label"]
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


def truncate_log(path: Path, epochs_done: int) -> None:
    """Keep the lines of the epochs a resumed checkpoint holds (a kill may have logged one more)."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["epoch"] <= epochs_done]
        atomic_write_text(path, "".join(line + "\n" for line in lines))


STATE_FILE, EMA_FILE = "fgvc_state.json", "ema.safetensors"


def save_checkpoint(accelerator: Accelerator, out: Path, state: TrainState, scheduler, ema, keep: int) -> None:
    """Accelerate's state (model, optimizer, RNG) plus ours (counters and schedule as JSON, EMA as
    safetensors: nothing that loads by unpickling) into a temporary folder, renamed into place once
    complete, so a kill at any moment leaves the previous checkpoint intact. Called on every process."""
    final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.epoch:04d}"
    tmp = out / "checkpoints" / f".tmp_{CHECKPOINT_PREFIX}{state.epoch:04d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_weights(ema.module, tmp / EMA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"train": state.state_dict(), "scheduler": scheduler.state_dict()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(out)[:-max(1, keep)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_extras(folder: Path, state: TrainState, scheduler, ema) -> None:
    saved = json.loads((folder / STATE_FILE).read_text())
    state.load_state_dict(saved["train"])
    scheduler.load_state_dict(saved["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(load_file(str(folder / EMA_FILE)))


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
