"""How fast the real training path runs, against a bare loop on the same model. It lives beside
the trainer (not in fgvc/analysis/, which never reaches into training) because it runs the loop.

    python fgvc/benchmark.py train [--recipe synth_baseline] [--epochs 6] [--set key=value ...]
    python fgvc/benchmark.py train --recipe cub_baseline --device cuda --fake-images 512   # on a GPU

Three measurements in one run, on the same recipe:
- the real path: `fgvc/train.py`'s loop (data loading, augmentation, logging, checkpointing), images
  per second of its training epochs after the first (which pays for start-up);
- a bare loop: forward, backward and step of the same model, optimizer and batch size on tensors
  already in memory, no data loading, no logging;
- the data pipeline alone: the same training DataLoader (workers, decoding, augmentation) iterated
  without a model.
Goals: real path >= 90% of the bare loop; data pipeline >= 2x what the model consumes.

Each rate is the median over epochs (after warm-up); the bare loop is timed before and after the
real path and its epochs pooled, so a change in machine load during the run shows in both.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgvc.bench.recipes import write_fake_set
from fgvc.config import load_recipe
from fgvc.data.build import build_datasets, delivered_side, make_loader, read_index
from fgvc.engine.losses import build_criterion, build_schedule
from fgvc.engine.optim import build_optimizer
from fgvc.engine.speed import apply_speed_switches
from fgvc.engine.trainer import train
from fgvc.errors import UserError
from fgvc.models.build import build_model, data_backbone, mean_std

WARMUP_EPOCHS = 1  # epochs not timed: first-call costs (allocator, worker start, JIT-like caches)


def real_path(cfg) -> float:
    """Images per second of the trainer's training epochs (train time only, after warm-up), median."""
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[WARMUP_EPOCHS:] or rows
    return statistics.median(r["train_images"] / r["train_seconds"] for r in timed)


def bare_loop(cfg, num_images: int, epochs: int, device: str = "cpu") -> list[float]:
    """Images per second of each epoch (after warm-up) of forward + backward + step on in-memory
    tensors, same model, switches, precision and optimizer, on `device`."""
    t = cfg.train
    torch.manual_seed(cfg.seed)
    index = read_index(cfg.data)
    model = build_model(cfg.model, index.num_classes, cfg.data.image_size).to(device).train()
    model = apply_speed_switches(model, t.channels_last, t.compile, t.grad_checkpointing)
    optimizer = build_optimizer(model, t)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
    scaler = torch.amp.GradScaler(device, enabled=precision == torch.float16)
    steps = max(1, num_images // t.batch_size)
    criterion, schedule = build_criterion(cfg), build_schedule(cfg, steps)
    size = delivered_side(cfg.data)  # what the loaders hand the model (data.full_resolution)
    images = torch.randn(steps, t.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, index.num_classes, (steps, t.batch_size), device=device)
    rates = []
    for epoch in range(WARMUP_EPOCHS + epochs):
        start = time.perf_counter()
        for i in range(steps):
            phase = {} if schedule is None else {"phase": schedule.phase(epoch * steps + i)}
            with torch.autocast(torch.device(device).type, dtype=precision, enabled=precision is not None):
                loss = criterion(model(images[i], **phase), labels[i])["loss"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * t.batch_size / (time.perf_counter() - start))
    return rates[WARMUP_EPOCHS:]


def data_pipeline(cfg) -> tuple[float, int]:
    """Images per second of the training DataLoader alone, and the number of training images."""
    mean, std = mean_std(data_backbone(cfg.model))
    data = build_datasets(cfg.data, cfg.seed, mean, std)
    loader = make_loader(data.train, cfg.train.batch_size, cfg.data.num_workers, True)
    rates = []
    for epoch in range(WARMUP_EPOCHS + 3):
        data.train.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates[WARMUP_EPOCHS:]), len(data.train)


def train_speed(recipe: str, epochs: int, overrides: list[str], device: str = "cpu", fake_images: int = 0) -> str:
    """The three rates on `device` (cpu | cuda); `fake_images` > 0 writes a fake copy of the recipe's
    data set (real layout and image size, random weights) with that many training images, so a
    real recipe can be timed on a GPU machine without the data set."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine; run it on a GPU machine "
                        "(with a CUDA build of torch) or use --device cpu.")
    use_cpu = os.environ.get("ACCELERATE_USE_CPU")
    if device == "cpu":  # the real path's Accelerator follows
        os.environ["ACCELERATE_USE_CPU"] = "1"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if fake_images:

                name = load_recipe([f"recipe={recipe}", *overrides]).data.name
                root = write_fake_set(name, Path(tmp) / "data", fake_images, 8)
                overrides = [f"data.root={root}", "model.pretrained=false", "data.val_fraction=0", *overrides]
            cfg = load_recipe([f"recipe={recipe}", f"train.epochs={epochs}", f"output_dir={tmp}/run", *overrides])
            data_rate, num_images = data_pipeline(cfg)
            timed = max(1, epochs - WARMUP_EPOCHS)
            before = bare_loop(cfg, num_images, timed, device)
            real = real_path(cfg)
            bare = statistics.median(before + bare_loop(cfg, num_images, timed, device))
    finally:
        os.environ.pop("ACCELERATE_USE_CPU", None)
        if use_cpu is not None:
            os.environ["ACCELERATE_USE_CPU"] = use_cpu
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"### Training speed: `{recipe}` ({cfg.model.arch}, {cfg.model.backbone}, {cfg.data.image_size} px, "
             f"batch {cfg.train.batch_size}, {cfg.data.num_workers} workers, {cfg.train.mixed_precision} precision, "
             f"{where})", "",
             "| path | images / s | against the bare loop |", "|---|---:|---:|",
             f"| bare loop (tensors in memory) | {bare:.1f} | 100% |",
             f"| fgvc/train.py loop (data, augmentation, logging, checkpoints) | {real:.1f} | {100 * real / bare:.0f}% |",
             f"| data pipeline alone | {data_rate:.1f} | {data_rate / bare:.1f}x |", "",
             f"Goals: train.py loop >= 90% of the bare loop ({'met' if real >= 0.9 * bare else 'not met'}); "
             f"data pipeline >= 2x the model's rate ({'met' if data_rate >= 2 * bare else 'not met'})."]
    return "\n".join(lines)


def step_times(recipe: str, sizes: list[int], overrides: list[str], rounds: int = 4, steps: int = 5) -> str:
    """Seconds per training step of a recipe's network at several input sizes (data.image_size), for
    planning a budget before any run: forward + backward + step of the recipe's model, optimizer,
    criterion and batch size on random tensors, `rounds` interleaved rounds of `steps` timed steps per
    size (one untimed step first in each round). A markdown table: median and fastest step per size,
    the fastest being the nearest to an idle machine's cost. Data loading and evaluation not included."""
    nets = {}
    for size in sizes:
        cfg = load_recipe([f"recipe={recipe}", *overrides, f"data.image_size={size}"])
        if cfg.data.name != "synthetic":
            raise UserError(f"step-time reads the number of classes of the synthetic set; recipe {recipe} reads "
                            f"data.name={cfg.data.name}: give a synth_ recipe.")
        t, classes = cfg.train, cfg.data.synthetic.num_classes
        torch.manual_seed(cfg.seed)
        model = apply_speed_switches(build_model(cfg.model, classes, size).train(), t.channels_last, t.compile,
                                     t.grad_checkpointing)
        nets[size] = (model, build_optimizer(model, t), build_criterion(cfg),
                      torch.randn(t.batch_size, 3, size, size), torch.randint(0, classes, (t.batch_size,)))
    seconds: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(rounds):
        for size, (model, optimizer, criterion, x, y) in nets.items():
            for i in range(steps + 1):
                start = time.perf_counter()
                criterion(model(x), y)["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i:
                    seconds[size].append(time.perf_counter() - start)
    batch = next(iter(nets.values()))[3].shape[0]
    lines = [f"{recipe} {' '.join(overrides)}: batch {batch}, {torch.get_num_threads()} thread(s), {rounds} interleaved "
             f"rounds x {steps} steps, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())} at the end", "",
             "| input | median s / step | fastest s / step |", "|---:|---:|---:|"]
    lines += [f"| {s} px | {statistics.median(v):.3f} | {min(v):.3f} |" for s, v in seconds.items()]
    return "\n".join(lines)
