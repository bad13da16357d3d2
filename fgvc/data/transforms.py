"""Pipelines that carry the bounding box and the part keypoints with the image.

Training (the fast path, no box or parts carried): a random resized crop chosen in the full image,
the JPEG decoded at the smallest DCT scale that keeps at least `image_size` pixels across the crop
(Pillow's draft mode: a 1000-px Cars photo cropped to half its side decodes at half size), the crop
resized once to the input size, a horizontal flip, optional RandAugment (timm) or colour jitter,
optional random erasing. Evaluation: resize the short side to `image_size * eval_resize` (decoded at
a reduced scale when the image is at least twice that), centre crop. Boxes and parts follow every
step of the evaluation (and of training when asked) through albumentations.

Images stay uint8 until the model's device: the pipeline returns (3, S, S) uint8 tensors (a quarter
of the bytes of float32 through the loader's queues and to the GPU), and `fgvc.models.build.model_input`
normalises them with the backbone's mean and std on the device, where it costs nothing.
"""

from __future__ import annotations

import math
import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check against PyPI on import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fgvc.data.records import ArrayImage, ImageFile  # noqa: E402

NO_BOX = np.full(4, np.nan, dtype=np.float32)
MIN_BOX_SIDE = 1.0  # pixels; albumentations rejects degenerate boxes
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios of the random resized crop (Szegedy et al. 2015)
CROP_ATTEMPTS = 10  # then the largest centred crop of an allowed ratio (torchvision's rule)
ERASE_AREA = (0.02, 1 / 3)  # random erasing (Zhong et al. 2020): share of the image erased
ERASE_RATIO = (0.3, 1 / 0.3)  # and the erased rectangle's aspect ratio, log-uniform
ERASE_ATTEMPTS = 10


def sample_crop(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random resized crop (x, y, w, h): area share ~ U(scale), aspect ratio log-uniform in CROP_RATIO."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def shrink_antialiased(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3): PIL's bilinear resize, whose triangle filter widens with
    the shrink factor (torch's `F.interpolate(mode="bilinear", antialias=True)` uses the same kernel)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR))


def random_erase(img: np.ndarray, p: float, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random erasing (Zhong et al., AAAI 2020), per-pixel mode: with probability p one rectangle of
    ERASE_AREA of the image is filled with noise that is N(0, 1) after normalisation, i.e.
    mean + std * N(0, 1) in 0..255 (clipped to uint8). (S, S, 3) uint8 in and out."""
    if p <= 0 or rng.random() >= p:
        return img
    height, width = img.shape[:2]
    log_ratio = (math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]))
    for _ in range(ERASE_ATTEMPTS):
        target = height * width * rng.uniform(*ERASE_AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < h < height and 0 < w < width:
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            noise = mean + std * rng.standard_normal((h, w, 3), dtype=np.float32)
            img = np.array(img)  # the input may be a read-only view
            img[y:y + h, x:x + w] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
            return img
    return img


class PairedTransform:
    """Image + box + keypoints -> (3, S, S) uint8 tensor, box (4,) x1 y1 x2 y2 and parts (P, 3)
    x y visible, all in network-input pixels. A flip swaps `flip_pairs` of parts. The image is an
    `ImageFile` (decoded here, at a reduced scale when that loses nothing) or a decoded (H, W, 3) array.

    With `annotations=False` the box and parts are not carried (they come back as nan / invisible):
    the training loop reads neither, so the training set takes the fast path. `randaugment` is a timm
    RandAugment string (e.g. "rand-m9-mstd0.5-inc1", Cubuk et al. 2020), applied after the flip;
    `random_erasing` the probability of erasing one rectangle (Zhong et al. 2020) at the end; both
    training only. `mean` and `std` (0..1 scale) give random erasing's fill."""

    def __init__(self, image_size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_scale: tuple[float, float] = (0.6, 1.0), hflip: float = 0.5,
                 color_jitter: float = 0.0, eval_resize: float = 1.143,
                 flip_pairs: list[tuple[int, int]] | None = None, annotations: bool = True,
                 randaugment: str = "", random_erasing: float = 0.0, antialias: bool = False) -> None:
        """`antialias`: shrink with PIL's bilinear filter widened to the shrink factor (as torchvision's
        and PIL's resize, and as fgvc's models shrink a full-resolution image: `F.interpolate(...,
        antialias=True)`, the same kernel) instead of bilinear sampling, which aliases detail finer than
        the output's pixels into a moire. Training (fast path) and evaluation; not with annotations
        in training."""
        if antialias and train and annotations:
            raise ValueError("antialias is not implemented for training with annotations.")
        self.image_size = image_size
        self.antialias = antialias
        self.train = train
        self.annotations = annotations
        self.crop_scale = tuple(crop_scale)
        self.eval_side = round(image_size * eval_resize)
        self.hflip = hflip if train else 0.0
        self.flip_pairs = list(flip_pairs or [])
        self.erase_p = random_erasing if train else 0.0
        self.fill_mean = np.asarray(mean, np.float32) * 255
        self.fill_std = np.asarray(std, np.float32) * 255
        self.randaugment = None
        if train and randaugment:
            if annotations:
                raise ValueError("RandAugment rotates and shears images, which boxes and parts would not follow; "
                                 "use it only without annotations.")
            from timm.data.auto_augment import rand_augment_transform

            self.randaugment = rand_augment_transform(randaugment, {
                "translate_const": int(image_size * 0.45),  # timm's train.py setting
                "img_mean": tuple(round(255 * m) for m in mean)})
        self.color = (A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=0.0, p=0.8) if train and color_jitter > 0 else None)
        if train:
            ops = [A.RandomResizedCrop(size=(image_size, image_size), scale=self.crop_scale)]
            ops += [self.color] if self.color is not None else []
        else:
            ops = [A.SmallestMaxSize(max_size=self.eval_side), A.CenterCrop(height=image_size, width=image_size)]
        self.geometry = A.Compose(
            ops,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["box_ids"], clip=True, min_area=0,
                                     min_visibility=0.0),
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False, label_fields=["part_ids"]),
        )
        self.rng = np.random.default_rng()

    def set_random_seed(self, seed: int) -> None:
        """Reseed every random choice (crop, flip, erasing, RandAugment, albumentations') from one
        generator pair. Called before every training image (fgvc/data/dataset.py), so it is kept cheap:
        albumentations' own `set_random_seed` would build a generator pair for the pipeline and each step."""
        self.rng = np.random.default_rng(seed)
        self.geometry.set_random_state(self.rng, random.Random(seed))
        if self.color is not None:
            self.color.set_random_state(self.rng, random.Random(seed))

    def __call__(self, image: np.ndarray | ImageFile | ArrayImage, box: np.ndarray | None,
                 parts: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = ArrayImage(image) if isinstance(image, np.ndarray) else image
        n_parts = 0 if parts is None else len(parts)
        if self.train and not self.annotations:
            return self._train_image(source), torch.from_numpy(NO_BOX.copy()), torch.zeros(n_parts, 3)
        # evaluation: decode at a reduced scale as long as the short side stays >= the resize target
        image, scale = source.decode(min(source.size) / self.eval_side if not self.train else 1.0)
        if self.antialias and min(image.shape[:2]) > self.eval_side:  # shrink here; SmallestMaxSize then keeps it
            f = self.eval_side / min(image.shape[:2])
            new_w, new_h = round(image.shape[1] * f), round(image.shape[0] * f)
            scale *= image.shape[1] / new_w  # boxes and parts below are divided by it (x and y alike, to 1e-2)
            image = shrink_antialiased(image, new_w, new_h)
        h, w = image.shape[:2]
        boxes, box_ids = [], []
        if box is not None and np.all(np.isfinite(box)):
            x, y, bw, bh = (float(v) / scale for v in box)
            x1, y1 = min(max(x, 0.0), w - MIN_BOX_SIDE), min(max(y, 0.0), h - MIN_BOX_SIDE)
            x2, y2 = min(max(x + bw, x1 + MIN_BOX_SIDE), w), min(max(y + bh, y1 + MIN_BOX_SIDE), h)
            boxes, box_ids = [(x1, y1, x2, y2)], [0]
        kps = [] if parts is None else [(float(px) / scale, float(py) / scale) for px, py, _ in parts]
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
        img = random_erase(img, self.erase_p, self.fill_mean, self.fill_std, self.rng)
        return to_tensor(img), torch.from_numpy(box_out), torch.from_numpy(parts_out)

    def _train_image(self, source: ImageFile | ArrayImage) -> torch.Tensor:
        """Crop chosen in full-image pixels -> decode at the smallest scale keeping >= S pixels across
        the crop -> one resize of the crop to S x S -> flip -> RandAugment / colour jitter -> erasing."""
        s = self.image_size
        x, y, w, h = sample_crop(*source.size, self.crop_scale, self.rng)
        image, scale = source.decode(min(w, h) / s)
        # the crop's edges on the decoded pixel grid: off by at most half a decoded pixel
        x0, y0 = round(x / scale), round(y / scale)
        x1, y1 = max(x0 + 1, round((x + w) / scale)), max(y0 + 1, round((y + h) / scale))
        crop = image[y0:y1, x0:x1]
        if self.antialias and min(crop.shape[:2]) > s:
            img = shrink_antialiased(crop, s, s)  # (S, S, 3)
        else:
            img = cv2.resize(crop, (s, s), interpolation=cv2.INTER_LINEAR)  # (S, S, 3)
        if self.hflip and self.rng.random() < self.hflip:
            img = img[:, ::-1]
        if self.randaugment is not None:
            img = np.asarray(self._randaugment(Image.fromarray(np.ascontiguousarray(img))))
        if self.color is not None:
            img = self.color(image=np.ascontiguousarray(img))["image"]
        img = random_erase(img, self.erase_p, self.fill_mean, self.fill_std, self.rng)
        return to_tensor(img)

    def _randaugment(self, pil: Image.Image) -> Image.Image:
        """timm's RandAugment draws from Python's and NumPy's global generators: seed them from this
        image's generator for the call, and give the caller's state back."""
        seed = int(self.rng.integers(2**31))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.randaugment(pil)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8, possibly a view -> (3, S, S) uint8 tensor (normalised on the model's device)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
