"""Fake copies of each real data set's on-disk layout, for tests and for the recipe benchmark.

Each `write_*` function writes a few classes and images under a folder exactly as the real archive
unpacks (same file names, same line formats, real .mat files for Stanford Cars) and returns a
`FakeLayout` with what the reader should find. The images are of mixed modes (RGB, grayscale, CMYK,
palette) like the odd ones in the real sets; small by default (tests), or of the real sets' sizes
(`size=`, `python fgvc/benchmark.py recipes`). `per_class` is (train, test) images of every class,
or a list of three such pairs, one per class.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIDE = (40, 30)  # (width, height) of every fake image unless stated
CUB_PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
                  "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]
NABIRDS_PART_NAMES = ["bill", "crown", "nape", "left eye", "right eye", "belly", "breast", "back",
                      "tail", "left wing", "right wing"]


@dataclass
class FakeLayout:
    root: Path  # what data.root should be set to
    class_names: list[str]  # in label order
    num_train: int
    num_test: int


def write_image(path: Path, mode: str, size: tuple[int, int] = IMAGE_SIDE, seed: int = 0,
                banner: int = 0) -> None:
    """A small noisy image in `mode` (RGB, L, CMYK, P, RGBA); palette and RGBA are saved as PNG.
    `banner` > 0 paints that many bottom rows white, like FGVC-Aircraft's copyright line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if banner:
        pixels[-banner:] = 255
    rgb = Image.fromarray(pixels)
    img = rgb.convert("P") if mode == "P" else rgb.convert(mode)
    img.save(path, format="PNG" if mode in ("P", "RGBA") else "JPEG", quality=95)


Counts = tuple[int, int] | list[tuple[int, int]]


def _counts(per_class: Counts) -> list[tuple[int, int]]:
    """(train, test) images of each of the three classes."""
    return list(per_class) if isinstance(per_class, list) else [tuple(per_class)] * 3


def _layout(root: Path, names: list[str], per_class: Counts) -> FakeLayout:
    counts = _counts(per_class)
    return FakeLayout(root, names, sum(c[0] for c in counts), sum(c[1] for c in counts))


def _lines(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(str(v) for v in row) + "\n" for row in rows))


def _cub_style(root: Path, classes: list[tuple[int, str]], images: list[dict], parts: list[tuple[int, str]],
               size: tuple[int, int] = IMAGE_SIDE) -> None:
    """Write the CUB-200-2011 text files; each image dict has id, rel, cls, train, box, parts, mode."""
    _lines(root / "classes.txt", classes)
    _lines(root / "images.txt", [(im["id"], im["rel"]) for im in images])
    _lines(root / "image_class_labels.txt", [(im["id"], im["cls"]) for im in images])
    _lines(root / "train_test_split.txt", [(im["id"], int(im["train"])) for im in images])
    _lines(root / "bounding_boxes.txt", [(im["id"], *(f"{v:.1f}" for v in im["box"])) for im in images])
    _lines(root / "parts" / "parts.txt", parts)
    locs = []
    for im in images:
        for (part_id, _), (x, y, visible) in zip(parts, im["parts"]):
            # the real files write an invisible part as 0 0 0
            locs.append((im["id"], part_id, *((f"{x:.1f}", f"{y:.1f}", 1) if visible else (0.0, 0.0, 0))))
    _lines(root / "parts" / "part_locs.txt", locs)
    for i, im in enumerate(images):
        write_image(root / "images" / im["rel"], im["mode"], size, seed=i)


def _part_locations(index: int, num_parts: int) -> list[tuple[float, float, int]]:
    """Deterministic parts; every third part of every other image is invisible."""
    return [(1.0 + index + p, 2.0 + p, 0 if (index % 2 == 0 and p % 3 == 0) else 1) for p in range(num_parts)]


MODES = ["L", "CMYK", "RGB"]  # the first image of the set is grayscale, the second CMYK


def write_cub(base: Path, per_class: Counts = (2, 1), size: tuple[int, int] = IMAGE_SIDE) -> FakeLayout:
    """CUB_200_2011/ under `base` with 3 classes, `per_class` = (train, test) images each.

    Image ids run 1..N in class order; image id i has box (i, i+1, 10+i, 12+i) and part p of it
    is at (i + p, 2 + p) (0-based p, ids written 1-based), invisible when i is odd and p % 3 == 0.
    """
    root = base / "CUB_200_2011"
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    classes = [(c + 1, f"{c + 1:03d}.{name}") for c, name in enumerate(names)]
    images = []
    for c, (class_id, folder) in enumerate(classes):
        for k in range(sum(_counts(per_class)[c])):
            i = len(images) + 1
            images.append(dict(id=i, rel=f"{folder}/{names[c]}_{k:04d}_{i}.jpg", cls=class_id,
                               train=k < _counts(per_class)[c][0], box=(i, i + 1, 10 + i, 12 + i),
                               parts=_part_locations(i - 1, len(CUB_PART_NAMES)),
                               mode=MODES[min(i - 1, 2)]))
    _cub_style(root, classes, images, [(p + 1, name) for p, name in enumerate(CUB_PART_NAMES)], size)
    return _layout(root, names, per_class)


NABIRDS_CLASSES = [(0, "Birds"), (1, "Perching Birds"), (295, "Red-tailed Hawk (Dark morph)"),
                   (817, "Oak Titmouse"), (1010, "Gulls, Terns, and Skimmers"),
                   (999, "Northern Cardinal (Adult Male)")]
NABIRDS_LEAVES = [817, 295, 1010]  # the order images use them in; labels follow numeric order


def nabirds_uuid(i: int) -> str:
    return str(uuid.UUID(int=0x1234_5678_9ABC_DEF0 * (i + 1)))


def write_nabirds(base: Path, per_class: Counts = (2, 1), size: tuple[int, int] = IMAGE_SIDE) -> FakeLayout:
    """nabirds/ under `base`: UUID ids, leaf classes 817, 295, 1010 (-> labels 1, 0, 2) among
    internal taxonomy nodes, 0-based part ids; boxes and parts as in `write_cub` (i = 1..N)."""
    root = base / "nabirds"
    images = []
    for c, class_id in enumerate(NABIRDS_LEAVES):
        for k in range(sum(_counts(per_class)[c])):
            i = len(images) + 1
            image_id = nabirds_uuid(i)
            images.append(dict(id=image_id, rel=f"{class_id:04d}/{image_id.replace('-', '')}.jpg",
                               cls=class_id, train=k < _counts(per_class)[c][0], box=(i, i + 1, 10 + i, 12 + i),
                               parts=_part_locations(i - 1, len(NABIRDS_PART_NAMES)),
                               mode=MODES[min(i - 1, 2)]))
    _cub_style(root, NABIRDS_CLASSES, images, list(enumerate(NABIRDS_PART_NAMES)), size)
    names = dict(NABIRDS_CLASSES)
    return _layout(root, [names[c] for c in sorted(NABIRDS_LEAVES)], per_class)


AIRCRAFT_LEVELS = {  # per class of the fake set: variant, family, manufacturer
    "variant": ["707-320", "F/A-18", "Cessna 172"],
    "family": ["Boeing 707", "F/A-18", "Cessna 172"],
    "manufacturer": ["Boeing", "McDonnell Douglas", "Cessna"],
}
AIRCRAFT_SIZE = (60, 50)  # (width, height) of the fake aircraft images, banner included
AIRCRAFT_BANNER = 20  # white rows at the bottom, to see that the reader's bottom_crop cuts them


def aircraft_id(i: int) -> str:
    return f"{34309 + i:07d}"  # real ids are 7 digits with leading zeros


def write_aircraft(base: Path, per_class: Counts = (2, 1), size: tuple[int, int] = AIRCRAFT_SIZE) -> FakeLayout:
    """fgvc-aircraft-2013b/data/ under `base`; image i (1..N) has the 1-based box
    (i, i+1, 20+i, 15+i) and ids aircraft_id(i). The bottom 20 rows of each image are white."""
    root = base / "fgvc-aircraft-2013b"
    data = root / "data"
    files = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
    for level, names in AIRCRAFT_LEVELS.items():
        _lines(data / files[level], [[name] for name in names])
    rows = {(level, split): [] for level in files for split in ("trainval", "test")}
    boxes = []
    i = 0
    for c in range(3):
        for k in range(sum(_counts(per_class)[c])):
            i += 1
            split = "trainval" if k < _counts(per_class)[c][0] else "test"
            for level, names in AIRCRAFT_LEVELS.items():
                rows[level, split].append((aircraft_id(i), names[c]))
            boxes.append((aircraft_id(i), i, i + 1, 20 + i, 15 + i))
            write_image(data / "images" / f"{aircraft_id(i)}.jpg", MODES[min(i - 1, 2)], size,
                        seed=i, banner=AIRCRAFT_BANNER)
    for (level, split), lines in rows.items():
        _lines(data / f"images_{level}_{split}.txt", lines)
    _lines(data / "images_box.txt", boxes)
    return _layout(root, AIRCRAFT_LEVELS["variant"], per_class)


CARS_CLASSES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012", "smart fortwo Convertible 2012"]


def _cars_records(per_class: Counts) -> list[dict]:
    """Image i (1..N): class 1..3, 1-based box corners (i, i+1, 20+i, 15+i), train or test."""
    records, i = [], 0
    for c in range(3):
        for k in range(sum(_counts(per_class)[c])):
            i += 1
            records.append(dict(i=i, cls=c + 1, test=k >= _counts(per_class)[c][0], box=(i, i + 1, 20 + i, 15 + i)))
    return records


def _mat_struct(rows: list[dict[str, object]]) -> np.ndarray:
    """A (1, N) MATLAB struct array as the Cars files hold it: numbers as [[v]], text as ['s']."""
    fields = list(rows[0])
    out = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, row in enumerate(rows):
        for f, v in row.items():
            if isinstance(v, str):
                out[0, j][f] = np.array([v])
            else:
                out[0, j][f] = np.array([[v]], dtype=np.uint16 if f.startswith("bbox") else np.uint8)
    return out


def _mat_names(names: list[str]) -> np.ndarray:
    cells = np.empty((1, len(names)), dtype=object)
    for j, name in enumerate(names):
        cells[0, j] = np.array([name])
    return cells


def _box_fields(box: tuple[int, int, int, int]) -> dict[str, int]:
    return dict(zip(("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"), box))


def write_cars_devkit(base: Path, test_labels_in: str = "root", per_class: Counts = (2, 1),
                      size: tuple[int, int] = IMAGE_SIDE) -> FakeLayout:
    """The devkit layout under base/stanford_cars; `test_labels_in` = root | devkit says where
    cars_test_annos_withlabels.mat goes. Train and test files are numbered 00001.jpg.. per split."""
    from scipy.io import savemat

    root = base / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _mat_names(CARS_CLASSES)})
    counters = {"train": 0, "test": 0}
    rows: dict[str, list] = {"train": [], "test": []}
    for rec in _cars_records(per_class):
        split = "test" if rec["test"] else "train"
        counters[split] += 1
        fname = f"{counters[split]:05d}.jpg"
        rows[split].append({**_box_fields(rec["box"]), "class": rec["cls"], "fname": fname})
        write_image(root / f"cars_{split}" / fname, MODES[min(rec["i"] - 1, 2)], size, seed=rec["i"])
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _mat_struct(rows["train"])})
    # the unlabelled test file ships in the devkit too; the reader must not take it for the labels
    savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": _mat_struct(
        [{k: v for k, v in r.items() if k != "class"} for r in rows["test"]])})
    where = root if test_labels_in == "root" else root / "devkit"
    savemat(where / "cars_test_annos_withlabels.mat", {"annotations": _mat_struct(rows["test"])})
    return _layout(root, CARS_CLASSES, per_class)


def write_cars_single(base: Path, per_class: Counts = (2, 1), size: tuple[int, int] = IMAGE_SIDE) -> FakeLayout:
    """The single-list layout under base/stanford_cars: cars_annos.mat and car_ims/00000i.jpg."""
    from scipy.io import savemat

    root = base / "stanford_cars"
    rows = []
    for rec in _cars_records(per_class):
        rel = f"car_ims/{rec['i']:06d}.jpg"
        rows.append({"relative_im_path": rel, **_box_fields(rec["box"]), "class": rec["cls"],
                     "test": int(rec["test"])})
        write_image(root / rel, MODES[min(rec["i"] - 1, 2)], size, seed=rec["i"])
    savemat(root / "cars_annos.mat", {"annotations": _mat_struct(rows), "class_names": _mat_names(CARS_CLASSES)})
    return _layout(root, CARS_CLASSES, per_class)


FOLDER_CLASSES = ["cat", "dog", "sea lion"]


def write_folder(base: Path) -> FakeLayout:
    """base/my_set/{train,test}/<class>/ with RGB, grayscale, CMYK, palette and RGBA images, plus
    files the reader must skip (.DS_Store, notes.txt)."""
    root = base / "my_set"
    modes = {"cat": ["RGB", "L"], "dog": ["P", "RGBA"], "sea lion": ["CMYK", "RGB"]}
    for c, (name, class_modes) in enumerate(modes.items()):
        for k, mode in enumerate(class_modes):
            suffix = ".png" if mode in ("P", "RGBA") else ".JPG" if k else ".jpg"
            write_image(root / "train" / name / f"{name}_{k}{suffix}", mode, seed=10 * c + k)
        write_image(root / "test" / name / f"{name}_test.jpeg", "RGB", seed=100 + c)
        (root / "train" / name / ".DS_Store").write_bytes(b"\0")
        (root / "train" / name / "notes.txt").write_text("not an image")
    return FakeLayout(root, FOLDER_CLASSES, 6, 3)
