"""Albumentations pipelines that carry the bounding box and the part keypoints with the image.

Training: random resized crop, horizontal flip (left and right parts swapped), optional colour
jitter. Evaluation: resize the short side to `image_size * eval_resize`, centre crop. Both end in
the backbone's mean/std normalisation.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check against PyPI on import

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

NO_BOX = np.full(4, np.nan, dtype=np.float32)
MIN_BOX_SIDE = 1.0  # pixels; albumentations rejects degenerate boxes


class PairedTransform:
    """Image + box + keypoints -> normalised (3, S, S) tensor, box (4,) x1 y1 x2 y2 and parts
    (P, 3) x y visible, all in network-input pixels. A flip swaps `flip_pairs` of parts.

    With `annotations=False` the box and parts are not carried (they come back as nan / invisible):
    albumentations' box and keypoint bookkeeping costs more than the crop itself, and the training
    loop reads neither, so the training set skips it (measured in results/train_speed.md)."""

    def __init__(self, image_size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_scale: tuple[float, float] = (0.6, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.0, eval_resize: float = 1.143,
                 flip_pairs: list[tuple[int, int]] | None = None, annotations: bool = True) -> None:
        self.image_size = image_size
        self.annotations = annotations
        self.hflip = hflip if train else 0.0
        self.flip_pairs = list(flip_pairs or [])
        if train:
            ops = [A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(crop_scale))]
            if color_jitter > 0:
                ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter,
                                         saturation=color_jitter, hue=0.0, p=0.8))
        else:
            ops = [A.SmallestMaxSize(max_size=round(image_size * eval_resize)),
                   A.CenterCrop(height=image_size, width=image_size)]
        if annotations:
            self.geometry = A.Compose(
                ops,
                bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_ids"], clip=True, min_area=0,
                                         min_visibility=0.0),
                keypoint_params=A.KeypointParams(format="xy", remove_invisible=False, label_fields=["part_ids"]),
            )
        else:
            self.geometry = A.Compose(ops)
        self.normalize = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        """Reseed every random choice (albumentations' and the flip's) from one generator pair.
        Called before every training image (fgvc/data/dataset.py), so it is kept cheap: albumentations'
        own `set_random_seed` would build a generator pair for the pipeline and each step."""
        self.rng = np.random.default_rng(seed)
        self.geometry.set_random_state(self.rng, random.Random(seed))

    def __call__(self, image: np.ndarray, box: np.ndarray | None, parts: np.ndarray | None):
        if not self.annotations:
            img = self.geometry(image=image)["image"]
            if self.hflip and self.rng.random() < self.hflip:
                img = img[:, ::-1]
            n_parts = 0 if parts is None else len(parts)
            return self._to_tensor(img), torch.from_numpy(NO_BOX.copy()), torch.zeros(n_parts, 3)
        h, w = image.shape[:2]
        boxes, box_ids = [], []
        if box is not None and np.all(np.isfinite(box)):
            x, y, bw, bh = (float(v) for v in box)
            x1, y1 = min(max(x, 0.0), w - MIN_BOX_SIDE), min(max(y, 0.0), h - MIN_BOX_SIDE)
            x2, y2 = min(max(x + bw, x1 + MIN_BOX_SIDE), w), min(max(y + bh, y1 + MIN_BOX_SIDE), h)
            boxes, box_ids = [(x1, y1, x2, y2)], [0]
        n_parts = 0 if parts is None else len(parts)
        kps = [] if parts is None else [(float(px), float(py)) for px, py, _ in parts]
        out = self.geometry(image=image, bboxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                            box_ids=box_ids, keypoints=np.array(kps, dtype=np.float32).reshape(-1, 2),
                            part_ids=list(range(n_parts)))
        img = out["image"]
        box_out = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        box_out = box_out[0] if len(box_out) else NO_BOX.copy()
        parts_out = np.zeros((n_parts, 3), dtype=np.float32)
        if n_parts:
            xy = np.asarray(out["keypoints"], dtype=np.float32).reshape(-1, 2)[:, :2]
            inside = (xy[:, 0] >= 0) & (xy[:, 0] < img.shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < img.shape[0])
            visible = (parts[:, 2] > 0) & inside  # visibility recomputed: points can leave the crop
            parts_out[:, :2] = np.where(visible[:, None], xy, 0.0)
            parts_out[:, 2] = visible
        if self.hflip and self.rng.random() < self.hflip:
            img = img[:, ::-1]
            width = img.shape[1]
            if np.all(np.isfinite(box_out)):
                box_out = np.array([width - box_out[2], box_out[1], width - box_out[0], box_out[3]], np.float32)
            if n_parts:
                vis = parts_out[:, 2] > 0
                parts_out[vis, 0] = width - parts_out[vis, 0]
                for left, right in self.flip_pairs:  # a flip turns the left wing into the right one
                    parts_out[[left, right]] = parts_out[[right, left]]
        return self._to_tensor(img), torch.from_numpy(box_out), torch.from_numpy(parts_out)

    def _to_tensor(self, img: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8, possibly a flipped view -> normalised (3, S, S) float tensor."""
        img = self.normalize(image=np.ascontiguousarray(img))["image"]
        return torch.from_numpy(img.transpose(2, 0, 1).copy())
