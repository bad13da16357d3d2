"""From the recipe's `data` section to data sets and loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from fgvc.data import aircraft, cars, cub, folder, nabirds  # noqa: F401  (register the readers)
from fgvc.data.dataset import FGVCDataset
from fgvc.data.fractal import FractalSpec, fractal_index
from fgvc.data.records import DATASETS, DatasetIndex, Sample
from fgvc.data.synthetic import SyntheticSpec, ensure_synthetic
from fgvc.data.transforms import PairedTransform
from fgvc.errors import DataError


def read_index(data: DictConfig) -> DatasetIndex:
    """The data set the recipe names; the synthetic one is generated on first use."""
    root = Path(data.root).expanduser()
    if data.name == "fractal":  # rendered when read: no files, data.root is not used
        return fractal_index(FractalSpec(**data.fractal))
    if data.name == "synthetic":
        folder_ = ensure_synthetic(root, SyntheticSpec(**data.synthetic))
        index = DATASETS.get("cub")(folder_)
        index.name = "synthetic"
        return index
    if not root.exists():
        raise DataError(f"data.root '{root}' does not exist; unpack the {data.name} data set there "
                        "or pass data.root=/path/to/it (see README.md, 'Real data sets').")
    if data.name == "aircraft":
        return DATASETS.get("aircraft")(root, level=data.aircraft_level)
    return DATASETS.get(data.name)(root)


def split_train_val(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified, seeded validation split carved from the training set."""
    if val_fraction <= 0:
        return list(samples), []
    labels = np.array([s.label for s in samples])
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    idx = np.arange(len(samples))
    try:
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError:  # too few images per class for a stratified split of this size
        train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed)
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


@dataclass
class DataSplits:
    index: DatasetIndex
    train: FGVCDataset
    val: FGVCDataset | None
    test: FGVCDataset


def delivered_side(data: DictConfig) -> int:
    """Side of the images the loaders deliver: data.image_size times data.full_resolution. Boxes and
    parts come in these pixels; models that read the extra pixels shrink the image to data.image_size."""
    return round(data.image_size * data.full_resolution)


def build_transform(data: DictConfig, train: bool, mean, std, flip_pairs, annotations: bool = True) -> PairedTransform:
    return PairedTransform(delivered_side(data), train, tuple(mean), tuple(std), crop_scale=tuple(data.crop_scale),
                           hflip=data.hflip, color_jitter=data.color_jitter, eval_resize=data.eval_resize,
                           flip_pairs=flip_pairs, annotations=annotations, randaugment=data.randaugment,
                           random_erasing=data.random_erasing, antialias=data.antialias)


def build_datasets(data: DictConfig, seed: int, mean, std, index: DatasetIndex | None = None,
                   train_annotations: bool = False) -> DataSplits:
    """Train (augmented), validation (carved from train, evaluation transform) and test sets.
    Validation and test items carry the box and parts; training items only when asked (the
    training loop reads neither, and carrying them costs more than the augmentation itself)."""
    index = index or read_index(data)
    train_s, val_s = split_train_val(index.train, data.val_fraction, seed)
    P = len(index.part_names)

    def make(samples: list[Sample], train: bool) -> FGVCDataset:
        annotations = train_annotations or not train
        return FGVCDataset(samples, build_transform(data, train, mean, std, index.flip_pairs, annotations),
                           index.bottom_crop, P, seed=seed if train else None, cache_mb=data.cache_mb)

    return DataSplits(index, make(train_s, True), make(val_s, False) if val_s else None, make(index.test, False))


def make_loader(dataset, batch_size: int, workers: int, train: bool, drop_last: bool = False) -> DataLoader:
    """Workers live as long as the loader (augmentation is seeded per sample and epoch, see
    fgvc/data/dataset.py), so an epoch pays neither their start nor a cold image cache."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
                      drop_last=drop_last, persistent_workers=workers > 0, pin_memory=False)
