"""The torch Dataset over a list of `Sample`s."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fgvc.data.records import Sample, load_rgb
from fgvc.data.transforms import PairedTransform


class FGVCDataset(Dataset):
    """Items are dicts: image (3, S, S) normalised, label, index (position in `samples`), box (4,)
    x1 y1 x2 y2 in input pixels (nan without a box), parts (P, 3) x y visible in input pixels."""

    def __init__(self, samples: list[Sample], transform: PairedTransform, bottom_crop: int = 0,
                 num_parts: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.bottom_crop = bottom_crop
        self.num_parts = num_parts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = load_rgb(s.path, self.bottom_crop)
        tensor, box, parts_t = self.transform(image, s.box, s.parts)
        if len(parts_t) != self.num_parts:  # a sample without part annotations in a set with parts
            parts_t = torch.zeros(self.num_parts, 3)
        return {"image": tensor, "label": s.label, "index": index, "box": box, "parts": parts_t}


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream. albumentations 2.0.8 otherwise
    repeats the same augmentation every epoch; torch.initial_seed() differs per worker and epoch."""
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    while hasattr(dataset, "dataset"):  # through Subset-like wrappers
        dataset = dataset.dataset
    dataset.transform.set_random_seed(torch.initial_seed() % 2**32)
