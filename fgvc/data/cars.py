"""Stanford Cars (Krause et al. 2013): 196 car models, 8,144 train / 8,041 test images, one box each.

Two layouts are in circulation; the reader detects which one `data.root` holds.

(a) The devkit layout (car_devkit.tgz, cars_train.tgz, cars_test.tgz, and the test labels):

    devkit/cars_meta.mat          class_names: (1, 196) cell of names
    devkit/cars_train_annos.mat   annotations: (1, N) struct bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname
    cars_test_annos_withlabels.mat   the same for the test images (here or in devkit/)
    cars_train/*.jpg, cars_test/*.jpg

(b) The single list (car_ims.tgz and cars_annos.mat):

    cars_annos.mat   annotations: (1, N) struct relative_im_path bbox_x1 .. bbox_y2 class test;
                     class_names: (1, 196)
    car_ims/*.jpg

Class ids are 1-based in both; boxes are 1-based inclusive corners. `scipy.io.loadmat` wraps every
scalar in arrays (`anno["class"]` is `[[7]]`, `anno["fname"]` is `['00001.jpg']`); `_scalar` and
`_text` unwrap them whatever the nesting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fgvc.errors import DataError
from fgvc.data.records import DATASETS, DatasetIndex, Sample, require_images

CARS_HINT = ("download Stanford Cars from its page: either car_devkit.tgz, cars_train.tgz, cars_test.tgz "
             "and cars_test_annos_withlabels.mat, or car_ims.tgz and cars_annos.mat, unpack them into "
             "one folder and set data.root to it.")
TEST_LABELS = "cars_test_annos_withlabels.mat"
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _scalar(value: Any) -> Any:
    """The one element of a loadmat value, however deep it is wrapped."""
    return np.asarray(value).reshape(-1)[0]


def _text(value: Any) -> str:
    return str(_scalar(value)).strip()


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    from scipy.io import loadmat  # imported here: only the Cars reader needs scipy

    if not path.is_file():
        raise DataError(f"annotation file '{path}' is missing; {CARS_HINT}")
    try:
        mat = loadmat(path)
    except Exception as err:  # scipy raises several unrelated types for a damaged file
        raise DataError(f"annotation file '{path}' cannot be read ({err.__class__.__name__}); "
                        "download it again.") from None
    for key in keys:
        if key not in mat:
            raise DataError(f"annotation file '{path}' has no '{key}' variable; it is not the Stanford "
                            f"Cars file of that name, download it again.")
    return mat


def _annotations(path: Path, fields: tuple[str, ...]) -> list[np.void]:
    """The struct array `annotations` as a flat list of records, each with `fields`."""
    annos = _load_mat(path, ("annotations",))["annotations"].reshape(-1)
    names = annos.dtype.names or ()
    missing = [field for field in fields if field not in names]
    if missing:
        fix = (f"the test labels are in {TEST_LABELS}, not cars_test_annos.mat"
               if missing[0] == "class" else "download it again")
        raise DataError(f"annotation file '{path}' has no field '{missing[0]}' in its annotations; {fix}.")
    return list(annos)


def _class_names(path: Path) -> list[str]:
    return [_text(name) for name in _load_mat(path, ("class_names",))["class_names"].reshape(-1)]


def _sample(anno: np.void, index: int, path: Path, image: Path, image_id: str, num_classes: int) -> Sample:
    """One annotation record: 1-based class to 0-based label, 1-based corners to x, y, w, h."""
    where = f"{path} entry {index + 1}"
    try:
        class_id = int(_scalar(anno["class"]))
        x1, y1, x2, y2 = (float(_scalar(anno[field])) for field in BOX_FIELDS)
    except (ValueError, TypeError, IndexError):
        raise DataError(f"{where} has a class or box that is not a number; download the file again.") from None
    if not 1 <= class_id <= num_classes:
        raise DataError(f"{where} has class {class_id} outside 1..{num_classes}; "
                        "the annotation files come from different copies, download them again.")
    box = np.array([x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], dtype=np.float32)
    return Sample(path=image, label=class_id - 1, image_id=image_id, box=box)


def _image_folder(root: Path, name: str) -> Path:
    """`root/name`, or `root/name/name` as some re-packaged copies nest it."""
    nested = root / name / name
    return nested if nested.is_dir() else root / name


def _read_devkit(root: Path) -> DatasetIndex:
    class_names = _class_names(root / "devkit" / "cars_meta.mat")
    test_labels = next((p for p in (root / TEST_LABELS, root / "devkit" / TEST_LABELS) if p.is_file()), None)
    if test_labels is None:
        raise DataError(f"the test labels '{TEST_LABELS}' are in neither '{root}' nor '{root / 'devkit'}'; "
                        "download them from the Stanford Cars page and put them in one of those folders.")
    splits, listed = {}, []
    for split, annos_path in (("train", root / "devkit" / "cars_train_annos.mat"), ("test", test_labels)):
        folder = _image_folder(root, f"cars_{split}")
        samples = splits[split] = []
        for index, anno in enumerate(_annotations(annos_path, ("class", "fname", *BOX_FIELDS))):
            fname = _text(anno["fname"])  # '00001.jpg', numbered anew in each split
            image = folder / fname
            listed.append((image, f"{annos_path} entry {index + 1}"))
            samples.append(_sample(anno, index, annos_path, image, f"{split}/{fname}", len(class_names)))
    require_images(listed, CARS_HINT)
    return DatasetIndex(name="cars", root=root, class_names=class_names, train=splits["train"],
                        test=splits["test"])


def _read_single_list(root: Path) -> DatasetIndex:
    annos_path = root / "cars_annos.mat"
    class_names = _class_names(annos_path)
    train, test, listed = [], [], []
    for index, anno in enumerate(_annotations(annos_path, ("class", "relative_im_path", "test", *BOX_FIELDS))):
        relative = _text(anno["relative_im_path"])  # 'car_ims/000001.jpg'
        image = root / relative
        listed.append((image, f"{annos_path} entry {index + 1}"))
        sample = _sample(anno, index, annos_path, image, relative, len(class_names))
        (test if int(_scalar(anno["test"])) == 1 else train).append(sample)
    require_images(listed, CARS_HINT)
    return DatasetIndex(name="cars", root=root, class_names=class_names, train=train, test=test)


@DATASETS.register("cars")
def read_cars(root: Path) -> DatasetIndex:
    """Stanford Cars in either layout, official split, boxes, labels 0..195."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root '{root}' is not a folder; {CARS_HINT}")
    if (root / "cars_annos.mat").is_file() and (root / "car_ims").is_dir():
        return _read_single_list(root)
    if (root / "devkit" / "cars_meta.mat").is_file():
        return _read_devkit(root)
    if (root / "cars_annos.mat").is_file():
        return _read_single_list(root)  # fails naming the first missing image under car_ims/
    raise DataError(f"data.root '{root}' holds neither Stanford Cars layout (looked for "
                    f"'{root / 'devkit' / 'cars_meta.mat'}' and '{root / 'cars_annos.mat'}'); {CARS_HINT}")
