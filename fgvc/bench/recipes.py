"""Every real recipe at its real size: two optimizer steps and one evaluation batch, on the CPU.

    python fgvc/benchmark.py recipes [--recipes cub_cbam ...] [--set key=value ...] [--out results/recipes.md]

Each `cub_`, `cars_`, `aircraft_` and `nabirds_` recipe runs through the real `train()` (data
loading, augmentation, mixed precision, checkpoint, final evaluation) with its own resolution,
backbone(s) and batch size, random weights (`model.pretrained=false`), on a fake copy of its data
set's on-disk layout (fgvc/bench/fake_layouts.py) whose images have the real set's typical size:
2 x batch training images (two optimizer steps), one batch of test images (one evaluation batch),
no validation split. Each recipe runs in its own process, so its peak memory is its own: the
process's peak resident set (`getrusage(RUSAGE_SELF).ru_maxrss`, what the kernel counts, torch's
allocations included; DataLoader worker processes not included). A recipe that does not fit in
memory is retried at half the batch, and the table says so. Each finished recipe's row is kept as
JSON in `--keep` (default `results/recipes/`), so a run that is stopped resumes where it was; a row
is reused only when the recipe and overrides it ran with are the same (`--fresh` measures all again).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from fgvc.analysis.cost import count_flops, count_parameters
from fgvc.bench import fake_layouts
from fgvc.config import available_recipes, load_recipe
from fgvc.engine.trainer import train
from fgvc.models.build import build_model
from fgvc.provenance import ROOT, code_version

REAL_PREFIXES = ("cub_", "cars_", "aircraft_", "nabirds_")
STEPS = 2  # optimizer steps per recipe
# data.name -> (fake layout writer, image (width, height), classes of the real set). Sizes: CUB's
# photos are at most 500 px wide (500x375 the most common); Cars, Aircraft and NABirds photos are
# about 1000 px and more wide (Aircraft's include the 20-px banner the reader cuts).
REAL_SETS = {
    "cub": ("write_cub", (500, 375), 200),
    "nabirds": ("write_nabirds", (1024, 683), 555),
    "cars": ("write_cars_devkit", (1024, 768), 196),
    "aircraft": ("write_aircraft", (1200, 820), 100),
}
OUT_OF_MEMORY = (-signal.SIGKILL, 137)  # the kernel's OOM killer; a MemoryError is caught below


def real_recipes() -> list[str]:
    return [r for r in available_recipes() if r.startswith(REAL_PREFIXES)]


def split_counts(total: int, parts: int = 3) -> list[int]:
    """`total` images over `parts` classes, as evenly as possible."""
    return [total // parts + (1 if c < total % parts else 0) for c in range(parts)]


def write_fake_set(name: str, base: Path, train_images: int, test_images: int) -> Path:
    """The data set's fake layout (real image size) with these numbers of images; its data.root."""
    writer, size, _ = REAL_SETS[name]
    per_class = list(zip(split_counts(train_images), split_counts(test_images)))
    return getattr(fake_layouts, writer)(base, per_class=per_class, size=size).root


def run_one(recipe: str, overrides: list[str], work: Path) -> dict:
    """Run the recipe for two steps and one evaluation batch in this process; what it cost."""
    import torch

    cfg = load_recipe([f"recipe={recipe}", *overrides])
    batch = cfg.train.batch_size
    root = write_fake_set(cfg.data.name, work / "data", STEPS * batch, batch)
    cfg = load_recipe([f"recipe={recipe}", "model.pretrained=false", f"data.root={root}",
                       "data.val_fraction=0", "train.epochs=1", "overwrite=true",
                       f"output_dir={work / 'run'}", *overrides])
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    row = json.loads((work / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # params and FLOPs of the network as the real data set makes it (its number of classes)
    model = build_model(cfg.model, REAL_SETS[cfg.data.name][2], cfg.data.image_size).eval()
    size = cfg.data.image_size
    return {"recipe": recipe, "batch": batch, "image_size": size, "arch": cfg.model.arch,
            "backbone": (f"{cfg.model.dcn.coarse_backbone} + {cfg.model.dcn.fine_backbone}"
                         if cfg.model.arch == "dcn" else cfg.model.backbone),
            "mixed_precision": cfg.train.mixed_precision, "num_workers": cfg.data.num_workers,
            "params": count_parameters(model), "flops": count_flops(model, torch.zeros(1, 3, size, size)),
            "step_s": row["train_seconds"] / STEPS, "run_s": seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_isolated(recipe: str, overrides: list[str], timeout: float) -> tuple[dict | None, str]:
    """`run_one` in a fresh process (its own peak memory); (result, '') or (None, why it failed)."""
    with tempfile.TemporaryDirectory(prefix=f"fgvc-{recipe}-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        try:
            proc = subprocess.run([sys.executable, "-m", "fgvc.bench.recipes", recipe, "--work", tmp,
                                   "--json", str(out), "--set", *overrides], capture_output=True, text=True, env=env,
                                  cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timeout after {timeout:.0f} s"
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text()), ""
        if proc.returncode in OUT_OF_MEMORY or "MemoryError" in proc.stderr or "DefaultCPUAllocator" in proc.stderr:
            return None, "out of memory"
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return None, (lines[-1] if lines else f"exit status {proc.returncode}")[:200]


def recipes_benchmark(recipes: list[str], overrides: list[str], timeout: float, keep: Path | None = None,
                      reuse: bool = True) -> str:
    """Run every recipe (halving the batch when it does not fit in memory) and make the table.

    A recipe's finished row is written to `keep/<recipe>.json` with the overrides it ran with and
    reused from there by the next call with the same overrides (a benchmark that outlives a session).
    """
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {code_version()}, on the CPU "
             f"({os.cpu_count()} cores, shared), random weights, fake data sets of the real layouts and image sizes "
             f"({', '.join(f'{k} {w}x{h}' for k, (_, (w, h), _) in REAL_SETS.items())}).", "",
             "| recipe | arch | backbone(s) | px | batch | params | GFLOPs / image | s / step | run s | "
             "peak memory (GiB) | completed |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for recipe in recipes:
        batch = load_recipe([f"recipe={recipe}", *overrides]).train.batch_size
        notes, result = [], None
        kept = keep / f"{recipe}.json" if keep is not None else None
        if reuse and kept is not None and kept.is_file():
            old = json.loads(kept.read_text())
            if old.get("overrides") == overrides:
                result, notes = old["result"], old["notes"]
        while result is None:
            result, why = run_isolated(recipe, [*overrides, f"train.batch_size={batch}"], timeout)
            if result is None and why == "out of memory" and batch > 1:
                notes.append(f"batch {batch} did not fit in memory")
                batch //= 2
                continue
            break
        if result is not None and kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps({"overrides": overrides, "notes": notes, "result": result}, indent=1))
        if result is None:
            lines.append(f"| {recipe} | | | | {batch} | | | | | | no: {why} |")
        else:
            r = result
            done = "yes" + (f" ({'; '.join(notes)})" if notes else "")
            lines.append(f"| {recipe} | {r['arch']} | {r['backbone']} | {r['image_size']} | {r['batch']} | "
                         f"{r['params'] / 1e6:.1f} M | {r['flops'] / 1e9:.1f} | {r['step_s']:.1f} | {r['run_s']:.0f} | "
                         f"{r['peak_rss_gib']:.1f} | {done} |")
        print(lines[-1], flush=True)
    lines += ["", f"s / step: the training epoch's time over its {STEPS} optimizer steps (data loading with the "
              "recipe's workers, forward, backward, step; the first step pays for start-up). run s: the whole "
              "`train()` call (run folder, both steps, checkpoint, the evaluation batch). Peak memory: the "
              "process's peak resident set (ru_maxrss), DataLoader workers not included. Params and FLOPs "
              "(2 per multiply-add, torch's FlopCounterMode via fgvc/analysis/cost.py, inference, one image) "
              "with the real data set's number of classes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The child process: one recipe, its result written as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--work", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args(argv)
    result = run_one(args.recipe, args.set, Path(args.work))
    Path(args.json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
