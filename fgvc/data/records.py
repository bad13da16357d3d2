"""What every data-set reader returns: a `DatasetIndex` of `Sample`s, images not yet read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fgvc.errors import DataError
from fgvc.registry import Registry

CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
             "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]


@dataclass
class Sample:
    path: Path
    label: int  # 0 .. num_classes - 1
    image_id: str  # the data set's own id (CUB: the line number of images.txt; NABirds: a UUID)
    box: np.ndarray | None = None  # (4,) float32: x, y, w, h in original image pixels
    parts: np.ndarray | None = None  # (P, 3) float32: x, y, visible (0/1), original pixels
    render: Callable[[], np.ndarray] | None = None  # images made when read (fractal set): () -> (H, W, 3) uint8


@dataclass
class DatasetIndex:
    name: str
    root: Path
    class_names: list[str]
    train: list[Sample]
    test: list[Sample]
    part_names: list[str] = field(default_factory=list)  # empty when the set has no parts
    flip_pairs: list[tuple[int, int]] = field(default_factory=list)  # (left, right) part indices
    bottom_crop: int = 0  # pixels cut from the bottom of every image (Aircraft's banner)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_parts(self) -> bool:
        return bool(self.part_names)


def flip_pairs_from_names(part_names: list[str]) -> list[tuple[int, int]]:
    """Pairs of ('left X', 'right X') indices, for swapping after a horizontal flip."""
    pairs = []
    for i, name in enumerate(part_names):
        if name.startswith("left "):
            other = "right " + name[len("left "):]
            if other in part_names:
                pairs.append((i, part_names.index(other)))
    return pairs


# name -> reader(root: Path, **options) -> DatasetIndex
DATASETS: Registry = Registry("data set")


WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNG/TIFF (Pillow: "I" or "I;16")


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as the photographer saw it: the EXIF orientation applied (a phone photo taken upright is
    stored sideways with a rotation tag), 16-bit grayscale scaled to 8 bits (Pillow's own
    conversion clips every value above 255, which turns a 16-bit image white), any other mode
    (grayscale, CMYK, palette, RGBA) converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(img, dtype=np.float64)  # (H, W), 0..65535
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_rgb(path: Path, bottom_crop: int = 0) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB (see `to_rgb`); the one function every tool reads images with."""
    try:
        with Image.open(path) as img:
            img = to_rgb(img)
            if bottom_crop:
                img = img.crop((0, 0, img.width, max(1, img.height - bottom_crop)))
            return np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"image '{path}' is missing; restore it from the data set's archive.") from None
    except Image.DecompressionBombError:
        raise DataError(f"image '{path}' has more than {2 * Image.MAX_IMAGE_PIXELS} pixels, Pillow's safety limit "
                        "against decompression bombs; shrink it, or remove it if it is not a real photo.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image '{path}' cannot be read ({err.__class__.__name__}); "
                        "replace it with an intact copy from the data set's archive.") from None


class ImageFile:
    """An image on disk, opened but not yet decoded: its size comes from the header, and a JPEG can
    be decoded at 1/2, 1/4 or 1/8 scale in the DCT (Pillow's draft mode, several times faster than
    decoding it whole) when the caller needs fewer pixels. `bottom_crop` rows are cut from the bottom.
    Errors are reported like `load_rgb`'s."""

    def __init__(self, path: Path, bottom_crop: int = 0) -> None:
        self.path = path
        self.bottom_crop = bottom_crop
        self.image = self._guard(lambda: Image.open(path))
        self.size = (self.image.width, max(1, self.image.height - bottom_crop))  # (W, H) usable

    def _guard(self, fn):
        try:
            return fn()
        except FileNotFoundError:
            raise DataError(f"image '{self.path}' is missing; restore it from the data set's archive.") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"image '{self.path}' cannot be read ({err.__class__.__name__}); "
                            "replace it with an intact copy from the data set's archive.") from None

    def decode(self, reduce: float = 1.0) -> tuple[np.ndarray, float]:
        """(H', W', 3) uint8 RGB decoded at the smallest scale 1/s (s in 1, 2, 4, 8, s <= `reduce`) the
        file allows, and s' = full width / decoded width, the factor from full to decoded pixels."""
        width, height = self.image.size
        if reduce >= 2:  # draft picks the largest s with size // s >= the requested size
            self.image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))

        def load() -> np.ndarray:
            img = self.image.convert("RGB") if self.image.mode != "RGB" else self.image
            return np.asarray(img)

        array = self._guard(load)
        scale = width / array.shape[1]
        if self.bottom_crop:
            array = array[:max(1, round(self.size[1] / scale))]
        return array, scale

    def close(self) -> None:
        self.image.close()


class ArrayImage:
    """An already decoded (H, W, 3) uint8 image (from the cache) behind `ImageFile`'s interface."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.size = (array.shape[1], array.shape[0])

    def decode(self, reduce: float = 1.0) -> tuple[np.ndarray, float]:
        return self.array, 1.0


def read_rows(path: Path, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) for every non-blank line of a whitespace-separated annotation file.

    The last field takes the rest of the line, so names with spaces survive ("3 left eye").
    `what` is the fix shown when the file is missing. A line with too few fields fails naming the
    file and line.
    """
    if not path.is_file():
        raise DataError(f"annotation file '{path}' is missing; {what}")
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=fields - 1) if fields else line.split()
        if fields and len(parts) != fields:
            raise DataError(f"{path}:{lineno} has {len(parts)} fields where {fields} were expected; "
                            "the file is damaged, unpack it again.")
        rows.append((lineno, parts))
    return rows


def read_text(path: Path) -> str:
    """An annotation file's text; a byte that is not UTF-8 fails naming the file and line.
    (utf-8-sig: a byte-order mark left by an editor must not become part of the first id.)"""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{lineno} holds a byte that is not UTF-8 text (0x{data[err.start]:02x}); "
                        "the file is damaged, unpack it again.") from None


def parse_number(text: str, path: Path, lineno: int, kind: type = float) -> float | int:
    """`kind(text)`, or a `DataError` naming the file and line holding the bad number."""
    try:
        return kind(text)
    except ValueError:
        raise DataError(f"{path}:{lineno} has '{text}' where a{'n integer' if kind is int else ' number'} "
                        "was expected; the file is damaged, unpack it again.") from None


def find_root(root: Path | str, marker: str, subfolders: list[str], hint: str) -> Path:
    """The folder holding `marker`: `root` itself or one of `subfolders` under it.

    Users point `data.root` either at the folder an archive unpacked to or at the one above it;
    both work. `hint` says where the data set comes from and where to point `data.root`.
    """
    root = Path(root).expanduser()
    candidates = [root, *(root / sub for sub in subfolders)]
    for folder in candidates:
        if (folder / marker).is_file():
            return folder
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder; {hint}")
    looked = ", ".join(f"'{folder / marker}'" for folder in candidates)
    raise DataError(f"data.root '{root}' holds no {marker} (looked for {looked}); {hint}")


def require_images(listed: list[tuple[Path, str]], hint: str) -> None:
    """Fail unless every image file exists; `listed` pairs each path with where it was listed."""
    missing = [(path, where) for path, where in listed if not os.path.isfile(path)]  # lighter than Path
    if missing:
        path, where = missing[0]
        more = f" (and {len(missing) - 1} more of {len(listed)} listed images)" if len(missing) > 1 else ""
        raise DataError(f"image '{path}' listed at {where} is missing{more}; {hint}")
