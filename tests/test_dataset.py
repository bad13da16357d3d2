"""The training data path: augmentation is a function of (seed, epoch, sample), whatever
the number of workers, with workers kept across epochs; decoded images are cached within a budget."""

from __future__ import annotations

import pytest
import torch

import fgvc.data.dataset as dataset_module
from fgvc.config import load_recipe
from fgvc.data.build import build_datasets
from fgvc.data.build import make_loader
from conftest import TINY_DATA

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_data(synth_root, *overrides: str):
    cfg = load_recipe(["recipe=synth_baseline", f"data.root={synth_root}", *TINY_DATA, *overrides])
    return build_datasets(cfg.data, cfg.seed, MEAN, STD)


def epoch_images(loader, dataset, epoch: int) -> dict[int, torch.Tensor]:
    dataset.set_epoch(epoch)
    return {int(i): img for batch in loader for i, img in zip(batch["index"], batch["image"])}


def test_augmentation_depends_on_seed_epoch_and_sample_not_on_workers(synth_root):
    data = tiny_data(synth_root)
    in_process = make_loader(data.train, 8, 0, True)
    workers = make_loader(data.train, 8, 2, True)
    assert workers.persistent_workers
    seen = {}
    for epoch in range(3):  # the same two workers serve all three epochs
        a, b = epoch_images(in_process, data.train, epoch), epoch_images(workers, data.train, epoch)
        assert set(a) == set(b) == set(range(len(data.train)))
        assert all(torch.equal(a[i], b[i]) for i in a)
        seen[epoch] = a
    assert not any(torch.equal(seen[0][i], seen[1][i]) for i in seen[0])  # a new crop every epoch
    other_seed = tiny_data(synth_root, "seed=1").train
    assert not torch.equal(epoch_images(make_loader(other_seed, 8, 0, True), other_seed, 0)[0], seen[0][0])


def test_decoded_images_are_cached_within_the_budget(synth_root, monkeypatch):
    reads = []
    real_load = dataset_module.load_rgb
    monkeypatch.setattr(dataset_module, "load_rgb", lambda *a: reads.append(a) or real_load(*a))
    real_file = dataset_module.ImageFile  # the uncached set opens the file for a reduced decode
    monkeypatch.setattr(dataset_module, "ImageFile", lambda *a: reads.append(a) or real_file(*a))
    uncached, cached = tiny_data(synth_root, "data.cache_mb=0").train, tiny_data(synth_root).train
    n = len(cached)
    for ds in (uncached, cached):
        ds.set_epoch(4)
    first = [cached[i]["image"] for i in range(n)]
    again = [cached[i]["image"] for i in range(n)]
    assert len(reads) == n  # the second pass decodes nothing
    assert all(torch.equal(a, b) and torch.equal(a, uncached[i]["image"]) for i, (a, b) in enumerate(zip(first, again)))
    assert len(reads) == 2 * n  # the uncached set decodes every time
    assert all(not cached.image(i).flags.writeable for i in range(n))  # a cached image cannot be changed

    budget = tiny_data(synth_root, "data.cache_mb=1").train
    one_image = budget.image(0).nbytes
    budget.cache_bytes = 3 * one_image  # room for exactly three decoded images
    for i in range(n):
        budget.image(i)
    decoded = len(reads)
    for i in range(n):
        budget.image(i)
    assert len(reads) - decoded == n - 3  # the budget kept three decoded images, no more


@pytest.mark.parametrize("key", ["data.cache_mb=-1", "data.num_workers=-2"])
def test_negative_loading_settings_are_refused(key):
    from fgvc.errors import UserError

    with pytest.raises(UserError, match="must each be 0 or more"):
        load_recipe(["recipe=synth_baseline", key])


def test_augment_seeds_differ_across_epochs_and_samples():
    seeds = {dataset_module.augment_seed(0, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)
    assert dataset_module.augment_seed(3, 1, 7) == dataset_module.augment_seed(3, 1, 7)
