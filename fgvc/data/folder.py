"""Users' own images, one sub-folder per class:

    root/train/<class name>/*.jpg   (also .jpeg .png .bmp .gif .tif .tiff .webp, any case)
    root/test/<class name>/*.jpg

Class names are the sorted sub-folder names of train/; a test class must also be a train class.
No boxes, no parts. Hidden files and files of other types are skipped.
"""

from __future__ import annotations

from pathlib import Path

from fgvc.errors import DataError
from fgvc.data.records import DATASETS, DatasetIndex, Sample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FOLDER_HINT = "lay the images out as data.root/train/<class>/*.jpg and data.root/test/<class>/*.jpg."
SPLITS = ("train", "test")


def _class_folders(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        raise DataError(f"folder '{split_dir}' is missing; {FOLDER_HINT}")
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"folder '{split_dir}' has no class sub-folders; {FOLDER_HINT}")
    return folders


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


@DATASETS.register("folder")
def read_folder(root: Path) -> DatasetIndex:
    """One class per sub-folder of root/train; labels follow the sorted folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder; {FOLDER_HINT}")
    train_folders = _class_folders(root / "train")
    class_names = [folder.name for folder in train_folders]
    label_of = {name: label for label, name in enumerate(class_names)}

    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        samples = splits[split] = []
        for folder in _class_folders(root / split):
            if folder.name not in label_of:
                raise DataError(f"test class folder '{folder}' has no counterpart in '{root / 'train'}'; "
                                "add training images for it or remove it from test.")
            images = _images(folder)
            if split == "train" and not images:
                raise DataError(f"class folder '{folder}' holds no images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add some or remove the folder.")
            samples.extend(Sample(path=path, label=label_of[folder.name],
                                  image_id=path.relative_to(root).as_posix()) for path in images)
    return DatasetIndex(name="folder", root=root, class_names=class_names, train=splits["train"],
                        test=splits["test"])
