"""fgvc's training loop against timm's train.py, side by side on the same data, model and settings.

    python fgvc/benchmark.py timm --timm-train PATH/TO/timm/train.py [--rounds 3] [--epochs 3] [--out results/timm_speed.md]

One data set for both: the built-in synthetic set of the `synth_baseline` recipe (CUB layout, read
by fgvc) and an ImageFolder view of the same files (hard links, `train/<class>/` from the training
split, `val/<class>/` from the test split) that timm's train.py reads with `--data-dir`. fgvc runs
with `data.val_fraction=0`, so both train on exactly the same images every epoch.

Each round runs `fgvc/train.py` and timm's train.py once each, as subprocesses with the same thread
count (`OMP_NUM_THREADS`), in alternating order (fgvc first in even rounds, timm first in odd ones),
so a change in the machine's load reaches both. What is timed, for both: the training part of each
epoch (data loading, augmentation, forward, backward, step), not validation, checkpoints or start-up;
the first `WARMUP_EPOCHS` epochs are not counted.
- fgvc: `train_seconds` and `train_images` of each epoch in the run's metrics.jsonl (the trainer's
  clock around `train_one_epoch`).
- timm: the line train.py logs at the last update of each epoch, `Train: E [ i/N (100%)] ...
  (avg s, rate/s)`: the mean seconds per update since the epoch's loader started, and the batch over
  that mean. The epoch's seconds are N x batch / rate (the rate has more digits than the time);
  timm's training loader drops a last partial batch, so every update has a full batch.
A round's rate is its timed images over its timed seconds; the result is the median over rounds of
fgvc / timm, with the lowest and highest round.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from fgvc.config import load_recipe
from fgvc.data.build import read_index
from fgvc.errors import RunError, UserError
from fgvc.provenance import ROOT, code_version

RECIPE = "synth_baseline"
# timm's train.py starts from random weights and has no lr multiplier for new layers: fgvc does the same
FROM_SCRATCH = ["model.weights=", "train.new_lr_mult=1.0"]
WARMUP_EPOCHS = 1  # epochs not timed: first-call costs (allocator, caches filling, lazy imports)
# the line timm's train.py logs after an update: epoch, update index, updates per epoch, then the
# epoch's mean so far in brackets: "(0.094s,  340.23/s)"
TIMM_UPDATE_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+)\s.*?\((\d+\.\d+)s,\s*(\d+\.\d+)/s\)")
# recipe keys the timm command below has no counterpart for, with the value it matches
UNMAPPED = {"model.arch": "classifier", "model.attention.type": "none", "train.mixed_precision": "no",
            "train.grad_accum_steps": 1, "train.ema": False, "train.mixup": 0.0, "train.cutmix": 0.0,
            "train.layer_decay": 0.0, "train.new_lr_mult": 1.0, "data.color_jitter": 0.0, "data.randaugment": "",
            "data.random_erasing": 0.0, "data.full_resolution": 1.0}


@dataclass
class RoundResult:
    order: str  # "fgvc, timm" or "timm, fgvc"
    fgvc: float  # images / s of the timed epochs
    timm: float

    @property
    def ratio(self) -> float:
        return self.fgvc / self.timm


def check_timm_train(path: str) -> Path:
    """The train.py to time; a path that is not a file is the user's mistake."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--timm-train '{path}' is not a file; pass the path of timm's train.py "
                        "(from a clone of github.com/huggingface/pytorch-image-models, e.g. `git show v1.0.31:train.py`).")
    return p.resolve()


def check_mappable(cfg: DictConfig) -> None:
    """Every setting the timm command does not carry must be at the value timm's command matches."""
    from omegaconf import OmegaConf

    off = [f"{k}={OmegaConf.select(cfg, k)}" for k, v in UNMAPPED.items() if OmegaConf.select(cfg, k) != v]
    if off:
        raise UserError(f"the timm comparison cannot give timm's train.py {', '.join(off)}; leave "
                        f"{'these keys' if len(off) > 1 else 'this key'} at the {RECIPE} recipe's value.")


def write_image_folder(index, dest: Path) -> Path:
    """An ImageFolder view of the set: `train/<class>/` holds the training split, `val/<class>/` the
    test split, as hard links to the same JPEGs (symlinks across file systems). Class folders are
    named `<label, 3 digits>.<class name>`, so ImageFolder's sorted order is fgvc's label order."""
    shutil.rmtree(dest, ignore_errors=True)
    for split, samples in (("train", index.train), ("val", index.test)):
        for s in samples:
            folder = dest / split / f"{s.label:03d}.{index.class_names[s.label]}"
            folder.mkdir(parents=True, exist_ok=True)
            source, link = Path(s.path).resolve(), folder / Path(s.path).name
            try:
                os.link(source, link)
            except OSError:
                link.symlink_to(source)
    return dest


def fgvc_command(overrides: list[str], epochs: int, data_root: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "fgvc" / "train.py"), f"recipe={RECIPE}", *overrides,
            f"train.epochs={epochs}", "data.val_fraction=0", f"data.root={data_root}", f"output_dir={out}",
            "overwrite=true"]


def timm_command(train_py: Path, cfg: DictConfig, num_classes: int, folder: Path, epochs: int, out: Path) -> list[str]:
    """timm's train.py with the recipe's model, data, optimizer and schedule, on the CPU, no AMP.
    The learning rate follows the same schedule: cosine stepped per update, `warmup_epochs` inside
    the epochs from timm's default warm-up lr (fgvc builds it with timm's scheduler factory too)."""
    t, d, m = cfg.train, cfg.data, cfg.model
    cmd = [sys.executable, str(train_py), "--data-dir", str(folder), "--model", m.backbone,
           "--num-classes", str(num_classes), "--img-size", str(d.image_size), "-b", str(t.batch_size),
           "--epochs", str(epochs), "--opt", t.optimizer, "--lr", str(t.lr), "--momentum", str(t.momentum),
           "--weight-decay", str(t.weight_decay), "--sched", t.scheduler, "--sched-on-updates",
           "--warmup-epochs", str(t.warmup_epochs), "--min-lr", str(t.min_lr), "--smoothing", str(t.label_smoothing),
           "--scale", *(str(s) for s in d.crop_scale), "--ratio", "0.75", "1.3333333333333333",
           "--hflip", str(d.hflip), "--color-jitter", "0", "--train-interpolation", "bilinear",
           "--drop", str(m.drop_rate), "--drop-path", str(m.drop_path), "--workers", str(d.num_workers),
           "--no-prefetcher", "--device", "cpu", "--seed", str(cfg.seed), "--output", str(out.parent),
           "--experiment", out.name]
    if m.pretrained:
        cmd.append("--pretrained")
    if t.clip_grad > 0:
        cmd += ["--clip-grad", str(t.clip_grad)]
    return cmd


def run_logged(cmd: list[str], env: dict[str, str], log: Path, who: str) -> None:
    """Run `cmd`, its output to `log`; a failure stops the benchmark with one sentence."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise RunError(f"{who} stopped with exit code {code} ({lines[-1].strip() if lines else 'no output'}); "
                       f"its output is in {log}.")


def fgvc_rate(run: Path) -> float:
    """Images / s of fgvc's timed epochs, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][WARMUP_EPOCHS:]
    if not rows:
        raise RunError(f"{run / 'metrics.jsonl'} has no epoch after the {WARMUP_EPOCHS} warm-up epoch(s); "
                       "run with --epochs 2 or more.")
    return sum(r["train_images"] for r in rows) / sum(r["train_seconds"] for r in rows)


def timm_epochs(log_text: str, batch_size: int) -> list[tuple[int, float]]:
    """(images, seconds) of each epoch timm's train.py logged, in order, from its last-update lines."""
    epochs = []
    for match in TIMM_UPDATE_LINE.finditer(log_text):
        epoch, index, updates, _, rate = match.groups()
        if int(index) + 1 == int(updates):
            images = int(updates) * batch_size  # the training loader drops a last partial batch
            epochs.append((images, images / float(rate)))
    return epochs


def timm_rate(log: Path, batch_size: int) -> float:
    """Images / s of timm's timed epochs, from its output."""
    timed = timm_epochs(log.read_text(errors="replace"), batch_size)[WARMUP_EPOCHS:]
    if not timed:
        raise RunError(f"no epoch after the warm-up in {log} ends with timm's 'Train: E [ i/N (100%)] ... "
                       "(avg s, rate/s)' line; this train.py logs in another format or ran too few epochs.")
    return sum(n for n, _ in timed) / sum(s for _, s in timed)


def timm_origin(train_py: Path) -> str:
    """Where the timed train.py comes from: its sha256, its git commit when it sits in a clone, and
    the timm it imports (a `timm/` package next to it wins over the installed one)."""
    from importlib.metadata import version

    digest = hashlib.sha256(train_py.read_bytes()).hexdigest()[:12]
    commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", train_py.name], cwd=train_py.parent,
                            capture_output=True, text=True).stdout.strip()
    local = train_py.parent / "timm" / "version.py"
    if local.is_file():
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", local.read_text())
        timm_version = f"{found.group(1) if found else 'unknown'} (the clone beside it)"
    else:
        timm_version = f"{version('timm')} (installed)"
    return (f"train.py sha256 {digest}" + (f", git commit {commit}" if commit else "")
            + f"; it imports timm {timm_version}")


def timm_speed(timm_train: str, rounds: int, epochs: int, threads: int, runs: Path, overrides: list[str],
               source: str = "") -> str:
    """Run both tools `rounds` times, alternating; the page's body (settings, table, median ratio)."""
    train_py = check_timm_train(timm_train)
    if epochs <= WARMUP_EPOCHS or rounds < 1:
        raise UserError(f"--epochs must be more than the {WARMUP_EPOCHS} warm-up epoch(s) and --rounds at "
                        "least 1; e.g. --epochs 3 --rounds 3.")
    overrides = [*FROM_SCRATCH, *overrides]
    cfg = load_recipe([f"recipe={RECIPE}", *overrides, f"train.epochs={epochs}", "data.val_fraction=0"])
    check_mappable(cfg)
    runs = runs.resolve()
    data_root = Path(cfg.data.root).expanduser().resolve()
    cfg.data.root = str(data_root)
    index = read_index(cfg.data)  # the synthetic set is written here, once, before any timing
    folder = write_image_folder(index, runs / "imagefolder")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = []
    for r in range(rounds):
        here = runs / f"round{r}"
        shutil.rmtree(here / "timm", ignore_errors=True)
        commands = {"fgvc": (fgvc_command(overrides, epochs, data_root, here / "fgvc"), "fgvc/train.py"),
                    "timm": (timm_command(train_py, cfg, index.num_classes, folder, epochs, here / "timm"),
                             f"timm's train.py ({train_py})")}
        order = ["fgvc", "timm"] if r % 2 == 0 else ["timm", "fgvc"]  # neither always runs first
        for who in order:
            run_logged(commands[who][0], env, here / f"{who}.log", commands[who][1])
        results.append(RoundResult(", ".join(order), fgvc_rate(here / "fgvc"),
                                   timm_rate(here / "timm.log", cfg.train.batch_size)))
        print(f"round {r + 1}/{rounds}: fgvc {results[-1].fgvc:.1f}, timm {results[-1].timm:.1f} images/s, "
              f"fgvc / timm {results[-1].ratio:.3f}", flush=True)
    return page(results, cfg, len(index.train), epochs, threads, timm_origin(train_py), source,
                code_version(), timm_command(train_py, cfg, index.num_classes, folder, epochs, runs / "roundN" / "timm"),
                fgvc_command(overrides, epochs, data_root, runs / "roundN" / "fgvc"))


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (`python fgvc/train.py`, not this interpreter's and checkout's paths)."""
    import shlex

    names = {sys.executable: "python", str(ROOT / "fgvc" / "train.py"): "fgvc/train.py"}
    return shlex.join([names.get(c, c) for c in cmd])


def page(results: list[RoundResult], cfg: DictConfig, train_images: int, epochs: int, threads: int, origin: str,
         source: str, code: str, timm_cmd: list[str], fgvc_cmd: list[str]) -> str:
    """The table, the verdict and what was compared, as markdown."""
    ratios = [r.ratio for r in results]
    median = statistics.median(ratios)
    faster = "fgvc" if median > 1 else "timm's train.py"
    t, d = cfg.train, cfg.data
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, fgvc {code}; timm: {origin}"
             + (f" ({source})" if source else "") + f". CPU ({os.cpu_count()} cores, shared with other jobs), "
             f"`OMP_NUM_THREADS={threads}` for both tools, one process at a time.", "",
             "| round | order | fgvc images / s | timm images / s | fgvc / timm |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {i + 1} | {r.order} | {r.fgvc:.1f} | {r.timm:.1f} | {r.ratio:.3f} |" for i, r in enumerate(results)]
    lines += ["", f"**fgvc / timm, median over {len(results)} rounds: {median:.2f}x** (rounds from {min(ratios):.2f}x "
              f"to {max(ratios):.2f}x): {faster} trains faster per image"
              + (" in every round." if all((x > 1) == (median > 1) for x in ratios) else ", not in every round."),
              "", "## What is timed",
              f"Each round trains both for {epochs} epochs of the same {train_images} images; the first "
              f"{WARMUP_EPOCHS} epoch(s) of each are not counted. Both clocks cover the training part of an "
              "epoch only (loader, augmentation, forward, backward, optimizer and scheduler steps), not "
              "validation, checkpoints or process start-up. fgvc: `train_seconds` and `train_images` per epoch in "
              "metrics.jsonl. timm: the `(mean s, images/s)` of the line train.py logs at each epoch's last update "
              "(its per-update clock starts before the epoch's loader is created). A round's rate is timed images "
              "over timed seconds; the order of the two alternates between rounds.", "",
              "## Settings (both)",
              f"Data: the synthetic set (`{RECIPE}`: {d.synthetic.num_classes} classes, {d.synthetic.image_size}-px "
              f"JPEGs), training split only ({train_images} images), no validation split carved from it. Model: timm "
              f"`{cfg.model.backbone}`, random weights. {d.image_size} px, batch {t.batch_size}, {t.optimizer} "
              f"(timm's factory: Nesterov) lr {t.lr}, momentum {t.momentum}, weight decay {t.weight_decay} (none on "
              f"biases and norms), {t.scheduler} schedule stepped per update with {t.warmup_epochs} warm-up epoch(s), "
              f"label smoothing {t.label_smoothing}, float32, {d.num_workers} loader workers, seed {cfg.seed}. "
              f"Augmentation: random resized crop (area {d.crop_scale[0]}-{d.crop_scale[1]}, ratio 3/4-4/3, "
              f"bilinear), horizontal flip {d.hflip}; nothing else.", "",
              f"fgvc: `{shown(fgvc_cmd)}`", "",
              f"timm: `{shown(timm_cmd)}`", "",
              "## Where the pipelines differ",
              "- Decoding: fgvc keeps decoded images in memory (`data.cache_mb`, the whole set fits), so it decodes "
              "each JPEG once; timm's ImageFolder decodes every image again every epoch (PIL).",
              "- Resizing: fgvc crops and resizes with OpenCV (albumentations, bilinear); timm with PIL "
              "(torchvision's `RandomResizedCropAndInterpolation`, bilinear with antialiasing).",
              "- Tensors: fgvc's loader hands over uint8 images and normalises them on the model's device; timm "
              "(`--no-prefetcher`, needed on the CPU) converts to float32 and normalises in the loader. timm "
              "also runs a `ColorJitter(0, 0, 0)` (its `--color-jitter 0`), which changes no pixel.",
              "- Loop: fgvc runs under Accelerate with a wrapped model (`Classifier` around the timm backbone); "
              "timm's train.py runs the bare model. fgvc reseeds the augmentation per image (same augmentations "
              "with any number of workers or on resume); timm seeds its loader per worker.",
              "- Per epoch outside the clock: timm validates on `val/` (the test split) every epoch; fgvc, with "
              "no validation split, evaluates the test split once at the end. Both write a checkpoint every epoch."]
    return "\n".join(lines)
