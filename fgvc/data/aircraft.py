"""FGVC-Aircraft 2013b (Maji et al. 2013): 10,000 images of aircraft, labelled at three levels
(100 variants, 70 families, 30 manufacturers), 6,667 trainval / 3,333 test images, one box each.

The archive `fgvc-aircraft-2013b.tar.gz` unpacks to `fgvc-aircraft-2013b/data/`:

    images/<image_id>.jpg
    images_box.txt                      <image_id> <xmin> <ymin> <xmax> <ymax>  (1-based, inclusive)
    images_<level>_{trainval,test}.txt  <image_id> <class name>
    variants.txt, families.txt, manufacturers.txt   one class name a line, the official order

Class names contain spaces and slashes ("F/A-18", "Cessna 172"), so a line splits on its first
space only. Every image carries a 20-pixel copyright banner at the bottom, cut when it is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fgvc.errors import DataError, UserError
from fgvc.data.records import (DATASETS, DatasetIndex, Sample, find_root, parse_number, read_rows,
                               require_images)

AIRCRAFT_HINT = ("download fgvc-aircraft-2013b.tar.gz from the FGVC-Aircraft page, unpack it and set "
                 "data.root to its fgvc-aircraft-2013b folder (or the data folder inside it).")
LEVEL_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
BANNER_HEIGHT = 20  # pixels: the photographer's copyright line along the bottom of every image
TRAIN_SPLIT = "trainval"  # the standard protocol trains on train + val and reports test


def read_class_names(path: Path) -> list[str]:
    """One name a line, in the official order; a repeated name fails."""
    names: dict[str, int] = {}
    for lineno, (name,) in read_rows(path, 1, AIRCRAFT_HINT):
        if name in names:
            raise DataError(f"{path}:{lineno} repeats class '{name}' of line {names[name]}; "
                            "the file is damaged, unpack it again.")
        names[name] = lineno
    return list(names)


def read_boxes(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """image id -> (line, (4,) x, y, w, h): 1-based inclusive corners to 0-based origin and size."""
    boxes = {}
    for lineno, (image_id, *corners) in read_rows(path, 5, AIRCRAFT_HINT):
        xmin, ymin, xmax, ymax = (parse_number(v, path, lineno) for v in corners)
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{path}:{lineno} has a box whose corners are swapped; "
                            "the file is damaged, unpack it again.")
        boxes[image_id] = (lineno, np.array([xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                                            dtype=np.float32))
    return boxes


@DATASETS.register("aircraft")
def read_aircraft(root: Path, level: str = "variant") -> DatasetIndex:
    """FGVC-Aircraft at `level` (variant | family | manufacturer); train = the official trainval."""
    if level not in LEVEL_FILES:
        raise UserError(f"data.aircraft_level '{level}' is not one of {', '.join(LEVEL_FILES)}; "
                        "set it to one of them.")
    root = find_root(root, "images_box.txt", ["data", "fgvc-aircraft-2013b/data"], AIRCRAFT_HINT)
    class_names = read_class_names(root / LEVEL_FILES[level])
    label_of = {name: label for label, name in enumerate(class_names)}
    boxes_path = root / "images_box.txt"
    boxes = read_boxes(boxes_path)

    splits: dict[str, list[Sample]] = {}
    seen: dict[str, str] = {}  # image id -> where it was first listed
    listed = []
    for split in (TRAIN_SPLIT, "test"):
        list_path = root / f"images_{level}_{split}.txt"
        samples = splits[split] = []
        for lineno, (image_id, name) in read_rows(list_path, 2, AIRCRAFT_HINT):
            where = f"{list_path}:{lineno}"
            if image_id in seen:
                raise DataError(f"{where} lists image '{image_id}' already listed at {seen[image_id]}; "
                                "the split files come from different copies, unpack them again.")
            seen[image_id] = where
            if name not in label_of:
                raise DataError(f"{where} has class '{name}' that {root / LEVEL_FILES[level]} does not "
                                "list; the files come from different copies, unpack them again.")
            if image_id not in boxes:
                raise DataError(f"{where} lists image '{image_id}' that {boxes_path} has no box for; "
                                "the files come from different copies, unpack them again.")
            path = root / "images" / f"{image_id}.jpg"
            listed.append((path, where))
            samples.append(Sample(path=path, label=label_of[name], image_id=image_id,
                                  box=boxes[image_id][1].copy()))
    require_images(listed, AIRCRAFT_HINT)
    return DatasetIndex(name="aircraft", root=root, class_names=class_names, train=splits[TRAIN_SPLIT],
                        test=splits["test"], bottom_crop=BANNER_HEIGHT)
