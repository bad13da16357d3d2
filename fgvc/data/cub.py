"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 5,994 train / 5,794 test images, one box and
15 part keypoints per image.

The archive `CUB_200_2011.tgz` unpacks to `CUB_200_2011/`, whose text files all key on the image
id of `images.txt`:

    images.txt               <image_id> <class folder>/<file>.jpg
    image_class_labels.txt   <image_id> <class_id>
    train_test_split.txt     <image_id> <1 = train, 0 = test>
    classes.txt              <class_id> <NNN.Class_name>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    parts/parts.txt          <part_id> <part name>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>  (invisible: x = y = 0)

NABirds uses the same layout (with UUID ids), so `read_cub_layout` serves both readers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np

from fgvc.errors import DataError
from fgvc.data.records import (DATASETS, DatasetIndex, Sample, find_root, flip_pairs_from_names,
                               parse_number, read_rows, read_text, require_images)

CUB_FOLDER = "CUB_200_2011"  # what the archive unpacks to
CUB_HINT = ("download CUB_200_2011.tgz from the Caltech-UCSD Birds-200-2011 page, unpack it and set "
            "data.root to its CUB_200_2011 folder (the one holding images.txt).")
MISMATCH_FIX = "the annotation files come from different copies; unpack them again from one archive."
CLASS_NUMBER = re.compile(r"^\d+\.")  # CUB's '001.' prefix on class names

Table = dict[str, tuple[int, list[str]]]  # key (first field) -> (line number, remaining fields)


def read_table(path: Path, fields: int, hint: str) -> Table:
    """Rows keyed by their first field (an image, class or part id); a repeated key fails."""
    table: Table = {}
    for lineno, row in read_rows(path, fields, hint):
        key = row[0]
        if key in table:
            raise DataError(f"{path}:{lineno} repeats id '{key}' of line {table[key][0]}; {MISMATCH_FIX}")
        table[key] = (lineno, row[1:])
    return table


def read_per_image(path: Path, fields: int, images: Table, images_path: Path, hint: str) -> Table:
    """A per-image file whose ids must be exactly those of images.txt, one line each."""
    table = read_table(path, fields, hint)
    for key, (lineno, _) in table.items():
        if key not in images:
            raise DataError(f"{path}:{lineno} names image id '{key}' that {images_path.name} does not "
                            f"list; {MISMATCH_FIX}")
    if len(table) != len(images):
        key = next(k for k in images if k not in table)
        raise DataError(f"{path} has {len(table)} lines for {len(images)} images: none for image id "
                        f"'{key}' ({images_path}:{images[key][0]}); {MISMATCH_FIX}")
    return table


def read_part_locations(path: Path, images: Table, part_ids: list[str], hint: str) -> np.ndarray:
    """(N, P, 3) float32 x, y, visible, images in `images` order; every image needs every part once.

    NABirds' file has over half a million lines: it is parsed in one vectorised pass, and only when
    that pass finds something wrong is it read again line by line to name the line.
    """
    fast = _part_locations_at_once(path, images, part_ids)
    return fast if fast is not None else _part_locations_by_line(path, images, part_ids, hint)


def _part_locations_at_once(path: Path, images: Table, part_ids: list[str]) -> np.ndarray | None:
    """The whole file in one pass, or None if anything in it is irregular."""
    if not path.is_file():
        return None
    text = read_text(path)
    table = np.array(text.split(), dtype=object)
    num_lines = sum(1 for line in text.splitlines() if line.strip())
    num_images, num_parts = len(images), len(part_ids)
    if table.size != 5 * num_lines or num_lines != num_images * num_parts:
        return None
    table = table.reshape(-1, 5)  # image id, part id, x, y, visible
    row_of = {key: i for i, key in enumerate(images)}
    column_of = {part_id: p for p, part_id in enumerate(part_ids)}
    try:
        rows = np.fromiter((row_of[key] for key in table[:, 0]), dtype=np.int64, count=num_lines)
        columns = np.fromiter((column_of[key] for key in table[:, 1]), dtype=np.int64, count=num_lines)
        values = table[:, 2:].astype(np.float32)  # (N * P, 3)
    except (KeyError, ValueError):
        return None
    slots = rows * num_parts + columns
    if np.bincount(slots, minlength=num_images * num_parts).max(initial=0) > 1:
        return None  # a repeated (image, part): with the count right, another one is missing
    if not np.isin(values[:, 2], (0, 1)).all():
        return None
    parts = np.empty((num_images * num_parts, 3), dtype=np.float32)
    parts[slots] = values
    return parts.reshape(num_images, num_parts, 3)


def _part_locations_by_line(path: Path, images: Table, part_ids: list[str], hint: str) -> np.ndarray:
    """The same, line by line, failing on the first wrong line with its number."""
    row_of = {key: i for i, key in enumerate(images)}
    column_of = {part_id: p for p, part_id in enumerate(part_ids)}
    parts = np.full((len(images), len(part_ids), 3), np.nan, dtype=np.float32)
    for lineno, (image_id, part_id, x, y, visible) in read_rows(path, 5, hint):
        if image_id not in row_of:
            raise DataError(f"{path}:{lineno} names image id '{image_id}' that images.txt does not list; "
                            f"{MISMATCH_FIX}")
        if part_id not in column_of:
            raise DataError(f"{path}:{lineno} names part id '{part_id}' that parts.txt does not list; "
                            f"{MISMATCH_FIX}")
        row = parts[row_of[image_id], column_of[part_id]]
        if not np.isnan(row[0]):
            raise DataError(f"{path}:{lineno} repeats part '{part_id}' of image id '{image_id}'; "
                            f"{MISMATCH_FIX}")
        flag = parse_number(visible, path, lineno)
        if flag not in (0, 1):
            raise DataError(f"{path}:{lineno} has visibility '{visible}' where 0 or 1 was expected; "
                            "the file is damaged, unpack it again.")
        row[:] = (parse_number(x, path, lineno), parse_number(y, path, lineno), flag)
    for image_id, locations in zip(images, parts):
        absent = np.isnan(locations[:, 0])
        if absent.any():
            raise DataError(f"{path} has no line for part '{part_ids[int(absent.argmax())]}' of image id "
                            f"'{image_id}'; {MISMATCH_FIX}")
    return parts


def read_cub_layout(root: Path, name: str, hint: str,
                    class_name: Callable[[str], str] = lambda text: text) -> DatasetIndex:
    """Read a CUB-style folder (CUB-200-2011, NABirds, the synthetic set).

    Labels are the class ids used by images.txt's images, in increasing numeric order, mapped to
    0..K-1: CUB's 1..200 become 0..199, NABirds' non-contiguous leaf ids become 0..554. Boxes are
    kept as written (x, y, w, h); a box reaching beyond its image is clipped by the transform.
    """
    images_path = root / "images.txt"
    images = read_table(images_path, 2, hint)
    labels_path = root / "image_class_labels.txt"
    labels = read_per_image(labels_path, 2, images, images_path, hint)
    split_path = root / "train_test_split.txt"
    split = read_per_image(split_path, 2, images, images_path, hint)
    boxes_path = root / "bounding_boxes.txt"
    boxes = read_per_image(boxes_path, 5, images, images_path, hint)
    classes_path = root / "classes.txt"
    classes = read_table(classes_path, 2, hint)
    part_table = read_table(root / "parts" / "parts.txt", 2, hint)
    part_ids = list(part_table)
    part_names = [fields[0] for _, fields in part_table.values()]
    parts = read_part_locations(root / "parts" / "part_locs.txt", images, part_ids, hint)

    name_of = {parse_number(key, classes_path, lineno, int): fields[0]
               for key, (lineno, fields) in classes.items()}
    class_of: dict[str, int] = {}
    for image_id, (lineno, (class_id,)) in labels.items():
        class_of[image_id] = parse_number(class_id, labels_path, lineno, int)
        if class_of[image_id] not in name_of:
            raise DataError(f"{labels_path}:{lineno} names class id '{class_id}' that {classes_path} "
                            f"does not list; {MISMATCH_FIX}")
    used = sorted(set(class_of.values()))  # numeric order: deterministic whatever the file order
    label_of = {class_id: label for label, class_id in enumerate(used)}
    class_names = [class_name(name_of[class_id]) for class_id in used]

    images_dir = root / "images"
    train, test, listed = [], [], []
    for index, (image_id, (lineno, (relative,))) in enumerate(images.items()):
        split_line, (flag,) = split[image_id]
        if flag not in ("0", "1"):
            raise DataError(f"{split_path}:{split_line} has '{flag}' where 1 (train) or 0 (test) was "
                            "expected; the file is damaged, unpack it again.")
        box_line, box_fields = boxes[image_id]
        path = images_dir / relative
        listed.append((path, f"{images_path}:{lineno}"))
        sample = Sample(path=path, label=label_of[class_of[image_id]], image_id=image_id,
                        box=np.array([parse_number(v, boxes_path, box_line) for v in box_fields],
                                     dtype=np.float32),
                        parts=parts[index])
        (train if flag == "1" else test).append(sample)
    require_images(listed, hint)
    return DatasetIndex(name=name, root=root, class_names=class_names, train=train, test=test,
                        part_names=part_names, flip_pairs=flip_pairs_from_names(part_names))


@DATASETS.register("cub")
def read_cub(root: Path) -> DatasetIndex:
    """CUB-200-2011 with its official split, boxes and 15 parts; class names lose their '001.'."""
    root = find_root(root, "images.txt", [CUB_FOLDER], CUB_HINT)
    return read_cub_layout(root, "cub", CUB_HINT, lambda text: CLASS_NUMBER.sub("", text))
