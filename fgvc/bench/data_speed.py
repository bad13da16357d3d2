"""How many images per second one loading process delivers at the real recipes' settings.

    python fgvc/benchmark.py data [--images 64] [--rounds 5] [--out results/data_speed.md]

The real training pipeline (fgvc/data: `FGVCDataset` + `PairedTransform`, through a DataLoader
with its collation, `data.cache_mb=0` as in the real recipes), timed in several rounds on the same
files, in ONE process with one torch and one OpenCV thread (what a DataLoader worker has). The files
are photo-like JPEGs (smooth colour fields with grain, quality 90) of CUB's common size (500x375) and
of a Cars-sized 1024x768 photo. From the rate, the number of loading processes a GPU needs follows
from its training throughput (PUBLISHED below).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fgvc.data.dataset import FGVCDataset
from fgvc.data.records import Sample
from fgvc.data.transforms import PairedTransform
from fgvc.provenance import code_version

SIZES = {"CUB (500x375)": (500, 375), "Cars-sized (1024x768)": (1024, 768)}
IMAGE_SIZE = 448
CROP_SCALE = (0.25, 1.0)  # the real recipes' data.crop_scale
BATCH = 16  # the real recipes' train.batch_size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as resnet50.tv_in1k's
JPEG_QUALITY = 90
GRAIN = 12.0  # std of the pixel grain, 0..255
BLOB = 25  # pixels per cell of the random colour field
# A published GPU training rate: NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README
# ("Training performance: NVIDIA DGX A100 (8x A100 80GB)"): 1 GPU, mixed precision, 224 px.
PUBLISHED = {"gpu": "A100 80GB", "images_per_s_224": 2470,
             "source": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
                       "training performance, 1x A100 80GB, mixed precision"}


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A JPEG-friendly stand-in for a photograph: a smooth random colour field plus grain."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (max(1, height // BLOB), max(1, width // BLOB), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(cells).resize((width, height), Image.BICUBIC), np.float32)
    return Image.fromarray(np.clip(field + rng.normal(0, GRAIN, field.shape), 0, 255).astype(np.uint8))


def rate(loader: DataLoader) -> tuple[float, float]:
    """Images per second of one pass over the loader: per second of this process's CPU time (what
    one loading process on a core of its own delivers) and per second of wall time (which, on a
    shared machine, also counts the time other processes held the cores)."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for batch in loader:
        n += len(batch["label"])
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def data_speed(num_images: int, rounds: int) -> str:
    import cv2

    torch.set_num_threads(1)  # what a DataLoader worker process has
    cv2.setNumThreads(1)
    lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {code_version()}, on this project's "
             "2-core CPU machine (shared with other work: rates vary with its load).", "",
             f"One loading process (1 torch thread, 1 OpenCV thread), training pipeline at {IMAGE_SIZE} px, "
             f"crop scale {list(CROP_SCALE)}, flip, batch {BATCH}; {num_images} photo-like JPEGs (quality "
             f"{JPEG_QUALITY}) per size, {rounds} rounds, median images/s per second of the process's CPU "
             "time (in brackets: per second of wall time).", "",
             "| images | fgvc: crop first, reduced decode, one resize, uint8 (img/s) | bytes per image |",
             "|---|---:|---|"]
    cub_rate = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, (w, h) in SIZES.items():
            paths = []
            for i in range(num_images):
                path = Path(tmp) / f"{w}x{h}_{i}.jpg"
                photo_like(w, h, i).save(path, quality=JPEG_QUALITY)
                paths.append(path)
            kb = statistics.mean(p.stat().st_size for p in paths) / 1024
            new = FGVCDataset([Sample(p, 0, str(i)) for i, p in enumerate(paths)],
                              PairedTransform(IMAGE_SIZE, True, MEAN, STD, crop_scale=CROP_SCALE, annotations=False),
                              seed=0, cache_mb=0)
            loader = DataLoader(new, batch_size=BATCH)
            rates = [rate(loader) for _ in range(rounds)]
            now, now_wall = (statistics.median(r[i] for r in rates) for i in (0, 1))
            cub_rate = cub_rate or now
            lines.append(f"| {label}, {kb:.0f} KB | {now:.0f} ({now_wall:.0f}) | "
                         f"float32 {3 * IMAGE_SIZE**2 * 4 / 2**20:.1f} MiB -> uint8 {3 * IMAGE_SIZE**2 / 2**20:.1f} MiB |")
    gpu_rate = PUBLISHED["images_per_s_224"] * (224 / IMAGE_SIZE) ** 2  # compute grows with the pixels
    workers = math.ceil(gpu_rate / cub_rate)
    lines += ["", f"Goal: >= 150 images/s per loading process on CUB-sized photos at {IMAGE_SIZE} px: "
              f"{'met' if cub_rate >= 150 else 'not met'} ({cub_rate:.0f}).", "",
              f"Loading processes for a ResNet-50 at {IMAGE_SIZE} px on one {PUBLISHED['gpu']}: its published training "
              f"rate at 224 px is {PUBLISHED['images_per_s_224']} images/s ({PUBLISHED['source']}); at {IMAGE_SIZE} px "
              f"a ResNet-50 does (448/224)^2 = 4x the work per image, so about {gpu_rate:.0f} images/s, which takes "
              f"{gpu_rate:.0f} / {cub_rate:.0f} = {gpu_rate / cub_rate:.1f}, i.e. {workers} loading processes at the "
              f"rate measured here (data.num_workers per GPU; the real recipes set 8, which leaves headroom for "
              f"slower CPU cores and larger photos)."]
    return "\n".join(lines)
