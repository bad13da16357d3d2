"""What every data-set reader returns: a `DatasetIndex` of `Sample`s, images not yet read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def load_rgb(path: Path, bottom_crop: int = 0) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB, whatever its mode (grayscale, CMYK, palette, RGBA)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if bottom_crop:
                img = img.crop((0, 0, img.width, max(1, img.height - bottom_crop)))
            return np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"image '{path}' is missing; restore it from the data set's archive.") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image '{path}' cannot be read ({err.__class__.__name__}); "
                        "replace it with an intact copy from the data set's archive.") from None


def read_rows(path: Path, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) for every non-blank line of a whitespace-separated annotation file.

    The last field takes the rest of the line, so names with spaces survive ("3 left eye").
    `what` is the fix shown when the file is missing. A line with too few fields fails naming the
    file and line.
    """
    if not path.is_file():
        raise DataError(f"annotation file '{path}' is missing; {what}")
    rows = []
    # utf-8-sig: a byte-order mark left by an editor must not become part of the first id
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=fields - 1) if fields else line.split()
        if fields and len(parts) != fields:
            raise DataError(f"{path}:{lineno} has {len(parts)} fields where {fields} were expected; "
                            "the file is damaged, unpack it again.")
        rows.append((lineno, parts))
    return rows


def read_lines(path: Path, fields: int, what: str) -> list[list[str]]:
    """Read a whitespace-separated annotation file; fail naming the file and line that is wrong."""
    return [parts for _, parts in read_rows(path, fields, what)]


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
