"""The torch Dataset over a list of `Sample`s.

Augmentation is a function of (run seed, epoch, sample index) alone: before each training sample
the pipeline is reseeded from those three numbers. So an epoch's augmentations are the same with 0,
2 or 8 DataLoader workers and on any number of processes, a resumed run sees exactly the
augmentations an uninterrupted one would, and workers can stay alive across epochs
(`persistent_workers`): they read the epoch from a shared-memory counter the trainer sets before
each epoch, instead of being forked anew with a reseeded pipeline. (albumentations 2.0.8 seeds its
pipeline once per process; without the reseeding, every worker would repeat its augmentations.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from fgvc.data.records import ArrayImage, ImageFile, Sample, load_rgb
from fgvc.data.transforms import PairedTransform

MIB = 2**20


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 32-bit seed for one sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class FGVCDataset(Dataset):
    """Items are dicts: image (3, S, S) uint8 (normalised on the model's device), label, index (position in `samples`), box (4,)
    x1 y1 x2 y2 in input pixels (nan without a box), parts (P, 3) x y visible in input pixels.

    `seed`: augmentation seed of the run (None: the transform is not reseeded per sample, as for
    the deterministic evaluation transform). `cache_mb`: decoded images kept in memory by each
    loading process (each DataLoader worker has its own), first come first kept; 0 turns it off.
    Decoding a JPEG costs more than the augmentation of a small image."""

    def __init__(self, samples: list[Sample], transform: PairedTransform, bottom_crop: int = 0,
                 num_parts: int = 0, seed: int | None = None, cache_mb: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.bottom_crop = bottom_crop
        self.num_parts = num_parts
        self.seed = seed
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # read by persistent workers
        self.cache_bytes = cache_mb * MIB
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating over an epoch (workers see it through shared memory)."""
        self.epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> np.ndarray:
        """The decoded (H, W, 3) uint8 image, from the cache when it holds it."""
        image = self._cache.get(index)
        if image is None:
            s = self.samples[index]
            image = s.render() if s.render is not None else load_rgb(s.path, self.bottom_crop)
            if self._cached_bytes + image.nbytes <= self.cache_bytes:
                image.setflags(write=False)  # augmentations must not change the cached copy
                self._cache[index] = image
                self._cached_bytes += image.nbytes
        return image

    def source(self, index: int) -> ArrayImage | ImageFile:
        """The image for the transform: decoded (and cached) while the cache has room, else the file,
        which the transform decodes at a reduced scale when the crop allows it."""
        if index in self._cache or self._cached_bytes < self.cache_bytes:
            return ArrayImage(self.image(index))
        return ImageFile(self.samples[index].path, self.bottom_crop)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        source = self.source(index)
        if self.seed is not None:
            self.transform.set_random_seed(augment_seed(self.seed, int(self.epoch), index))
        try:
            tensor, box, parts_t = self.transform(source, s.box, s.parts)
        finally:
            if hasattr(source, "close"):  # a file opened for this item
                source.close()
        if len(parts_t) != self.num_parts:  # a sample without part annotations in a set with parts
            parts_t = torch.zeros(self.num_parts, 3)
        return {"image": tensor, "label": s.label, "index": index, "box": box, "parts": parts_t}
