"""Each data-set reader on a tiny fake copy of its real layout (tests/fake_layouts.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fgvc.data.aircraft  # noqa: F401  (each import registers its reader)
import fgvc.data.cars  # noqa: F401
import fgvc.data.cub  # noqa: F401
import fgvc.data.folder  # noqa: F401
import fgvc.data.nabirds  # noqa: F401
from fgvc.data.records import CUB_PARTS, DATASETS, load_rgb
from fgvc.errors import DataError, UserError

from fake_layouts import (AIRCRAFT_LEVELS, AIRCRAFT_SIZE, CARS_CLASSES, IMAGE_SIDE, NABIRDS_PART_NAMES,
                          aircraft_id, nabirds_uuid, write_aircraft, write_cars_devkit, write_cars_single,
                          write_cub, write_folder, write_nabirds)


def read(name: str, root: Path, **options):
    return DATASETS.get(name)(root, **options)


def edit_line(path: Path, lineno: int, new: str | None) -> None:
    """Replace (or, with None, delete) the 1-based line `lineno` of a text file."""
    lines = path.read_text().splitlines()
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_all_readers_are_registered():
    assert {"cub", "cars", "aircraft", "nabirds", "folder"} <= set(DATASETS)


# --- CUB-200-2011 ---------------------------------------------------------------------------------

def test_cub_reads_classes_split_boxes_and_parts(tmp_path):
    fake = write_cub(tmp_path)
    index = read("cub", fake.root)
    assert index.name == "cub"
    assert index.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert (len(index.train), len(index.test)) == (6, 3)
    assert [s.label for s in index.train] == [0, 0, 1, 1, 2, 2]
    assert [s.label for s in index.test] == [0, 1, 2]
    assert [s.image_id for s in index.test] == ["3", "6", "9"]
    first = index.train[0]
    assert first.path == fake.root / "images/001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg"
    np.testing.assert_array_equal(first.box, [1, 2, 11, 13])  # x, y, w, h as written
    assert first.box.dtype == np.float32
    # 15 parts; image 1 is odd, so parts 0, 3, 6, 9, 12 are invisible and written as 0 0 0
    assert index.part_names == CUB_PARTS
    assert first.parts.shape == (15, 3) and first.parts.dtype == np.float32
    np.testing.assert_array_equal(first.parts[:, 2], [0 if p % 3 == 0 else 1 for p in range(15)])
    np.testing.assert_array_equal(first.parts[0], [0, 0, 0])
    np.testing.assert_array_equal(first.parts[1], [2, 3, 1])  # part p of image i at (i + p, 2 + p)
    assert index.train[1].parts[:, 2].all()  # image 2: all visible
    names = index.part_names
    assert {(names[a], names[b]) for a, b in index.flip_pairs} == {
        ("left eye", "right eye"), ("left leg", "right leg"), ("left wing", "right wing")}


def test_cub_root_may_be_the_folder_above(tmp_path):
    fake = write_cub(tmp_path)
    assert read("cub", tmp_path).root == fake.root


def test_cub_missing_image_names_it_and_its_line(tmp_path):
    fake = write_cub(tmp_path)
    victim = next((fake.root / "images").rglob("*_0001_5.jpg"))
    victim.unlink()
    with pytest.raises(DataError, match=re.escape(f"'{victim}' listed at {fake.root / 'images.txt'}:5 is missing")):
        read("cub", fake.root)


@pytest.mark.parametrize("file, lineno, bad, expected", [
    ("bounding_boxes.txt", 4, "4 1.0 2.0", r"bounding_boxes\.txt:4 has 3 fields where 5"),
    ("bounding_boxes.txt", 2, "2 1.0 2.0 x 4.0", r"bounding_boxes\.txt:2 has 'x' where a number"),
    ("image_class_labels.txt", 3, "3 7", r"image_class_labels\.txt:3 names class id '7'"),
    ("train_test_split.txt", 6, "6 2", r"train_test_split\.txt:6 has '2' where 1 \(train\) or 0"),
    ("train_test_split.txt", 6, "66 1", r"train_test_split\.txt:6 names image id '66'"),
    ("parts/part_locs.txt", 20, "2 5 1.0 2.0 7", r"part_locs\.txt:20 has visibility '7'"),
    ("images.txt", 2, "1 001.Black_footed_Albatross/x.jpg", r"images\.txt:2 repeats id '1' of line 1"),
])
def test_cub_malformed_line_names_file_and_line(tmp_path, file, lineno, bad, expected):
    fake = write_cub(tmp_path)
    edit_line(fake.root / file, lineno, bad)
    with pytest.raises(DataError, match=expected):
        read("cub", fake.root)


def test_cub_counts_must_agree_across_files(tmp_path):
    fake = write_cub(tmp_path)
    edit_line(fake.root / "bounding_boxes.txt", 7, None)
    with pytest.raises(DataError, match=r"bounding_boxes\.txt has 8 lines for 9 images: none for image id '7' "
                                        r"\(.*images\.txt:7\)"):
        read("cub", fake.root)


def test_cub_every_image_needs_every_part(tmp_path):
    fake = write_cub(tmp_path)
    edit_line(fake.root / "parts/part_locs.txt", 15 + 2, None)  # image 2, part 2 ('beak')
    with pytest.raises(DataError, match=r"part_locs\.txt has no line for part '2' of image id '2'"):
        read("cub", fake.root)


def test_cub_missing_annotation_file_and_root(tmp_path):
    fake = write_cub(tmp_path)
    (fake.root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt' is missing; download CUB_200_2011\.tgz"):
        read("cub", fake.root)
    with pytest.raises(DataError, match=r"data\.root '.*nowhere' is not a folder"):
        read("cub", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"holds no images\.txt"):
        read("cub", fake.root / "images")


# --- NABirds --------------------------------------------------------------------------------------

def test_nabirds_maps_leaf_classes_in_numeric_order(tmp_path):
    fake = write_nabirds(tmp_path)
    index = read("nabirds", fake.root)
    # leaves used by images: 817, 295, 1010 (in file order) -> labels by numeric order 295, 817, 1010;
    # the taxonomy's inner nodes (0 Birds, 1 Perching Birds) and the unused 999 are no classes
    assert index.class_names == ["Red-tailed Hawk (Dark morph)", "Oak Titmouse", "Gulls, Terns, and Skimmers"]
    assert [s.label for s in index.train] == [1, 1, 0, 0, 2, 2]
    assert [s.label for s in index.test] == [1, 0, 2]
    assert index.train[0].image_id == nabirds_uuid(1)
    assert index.train[0].path.parent.name == "0817"
    assert index.part_names == NABIRDS_PART_NAMES  # 0-based part ids in file order
    np.testing.assert_array_equal(index.train[0].parts[:, 2], [0 if p % 3 == 0 else 1 for p in range(11)])
    names = index.part_names
    assert {(names[a], names[b]) for a, b in index.flip_pairs} == {("left eye", "right eye"),
                                                                   ("left wing", "right wing")}
    assert read("nabirds", tmp_path).class_names == index.class_names  # the folder above works too


def test_nabirds_missing_image_and_bad_line(tmp_path):
    fake = write_nabirds(tmp_path)
    edit_line(fake.root / "image_class_labels.txt", 2, f"{nabirds_uuid(2)} many")
    with pytest.raises(DataError, match=r"image_class_labels\.txt:2 has 'many' where an integer"):
        read("nabirds", fake.root)
    fake = write_nabirds(tmp_path / "again")
    victim = next((fake.root / "images").rglob(f"{nabirds_uuid(4).replace('-', '')}.jpg"))
    victim.unlink()
    with pytest.raises(DataError, match=re.escape(f"{victim}' listed at {fake.root / 'images.txt'}:4")):
        read("nabirds", fake.root)


# --- FGVC-Aircraft --------------------------------------------------------------------------------

@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
def test_aircraft_levels(tmp_path, level):
    fake = write_aircraft(tmp_path)
    index = read("aircraft", fake.root, level=level)
    assert index.class_names == AIRCRAFT_LEVELS[level]  # 'F/A-18', 'Cessna 172' kept whole
    assert [s.label for s in index.train] == [0, 0, 1, 1, 2, 2]
    assert [s.label for s in index.test] == [0, 1, 2]
    assert index.bottom_crop == 20
    assert index.train[0].image_id == "0034310" == aircraft_id(1)
    assert not index.has_parts


def test_aircraft_boxes_and_roots(tmp_path):
    fake = write_aircraft(tmp_path)
    for root in (tmp_path, fake.root, fake.root / "data"):  # folder above, archive folder, data folder
        index = read("aircraft", root)
        assert index.root == fake.root / "data"
    # image 1's box is written 1-based inclusive as 1 2 21 16 -> x, y, w, h = 0, 1, 21, 15
    np.testing.assert_array_equal(index.train[0].box, [0, 1, 21, 15])


def test_aircraft_errors(tmp_path):
    fake = write_aircraft(tmp_path)
    data = fake.root / "data"
    with pytest.raises(UserError, match="data.aircraft_level 'model'"):
        read("aircraft", fake.root, level="model")
    edit_line(data / "images_variant_test.txt", 2, f"{aircraft_id(6)} F/A-19")
    with pytest.raises(DataError, match=r"images_variant_test\.txt:2 has class 'F/A-19' that .*variants\.txt"):
        read("aircraft", fake.root)
    edit_line(data / "images_variant_test.txt", 2, f"{aircraft_id(1)} F/A-18")
    with pytest.raises(DataError, match=r"images_variant_test\.txt:2 lists image '0034310' already listed at "
                                        r".*images_variant_trainval\.txt:1"):
        read("aircraft", fake.root)
    edit_line(data / "images_variant_test.txt", 2, f"{aircraft_id(6)} F/A-18")
    edit_line(data / "images_box.txt", 3, f"{aircraft_id(3)} 1 2 3")
    with pytest.raises(DataError, match=r"images_box\.txt:3 has 4 fields where 5"):
        read("aircraft", fake.root)
    edit_line(data / "images_box.txt", 3, f"{aircraft_id(3)} 1 2 30 40")
    (data / "images" / f"{aircraft_id(3)}.jpg").unlink()
    with pytest.raises(DataError, match=r"0034312\.jpg' listed at .*images_variant_test\.txt:1 is missing"):
        read("aircraft", fake.root)


# --- Stanford Cars --------------------------------------------------------------------------------

def cars_summary(index):
    return [(s.label, s.box.tolist()) for s in index.train], [(s.label, s.box.tolist()) for s in index.test]


@pytest.mark.parametrize("writer", [lambda p: write_cars_devkit(p, "root"), lambda p: write_cars_devkit(p, "devkit"),
                                    write_cars_single], ids=["devkit-labels-at-root", "devkit-labels-in-devkit",
                                                             "single-list"])
def test_cars_both_layouts_read_the_same(tmp_path, writer):
    fake = writer(tmp_path)
    index = read("cars", fake.root)
    assert index.class_names == CARS_CLASSES  # 'Ram C/V Cargo Van Minivan 2012' whole
    train, test = cars_summary(index)
    assert [label for label, _ in train] == [0, 0, 1, 1, 2, 2]  # 1-based class ids -> 0-based
    assert [label for label, _ in test] == [0, 1, 2]
    # image 1 has 1-based corners (1, 2, 21, 16) -> x, y, w, h = (0, 1, 21, 15)
    assert train[0][1] == [0, 1, 21, 15]
    assert test[0][1] == [2, 3, 21, 15]  # image 3, the first test image
    assert not index.has_parts and all(s.path.is_file() for s in index.train + index.test)


def test_cars_image_ids_are_unique_and_nested_image_folders_work(tmp_path):
    fake = write_cars_devkit(tmp_path)
    index = read("cars", fake.root)
    ids = [s.image_id for s in index.train + index.test]
    assert len(set(ids)) == len(ids) and ids[0] == "train/00001.jpg" and index.test[0].image_id == "test/00001.jpg"
    # some re-packaged copies unpack to cars_train/cars_train/*.jpg
    for split in ("cars_train", "cars_test"):
        (fake.root / split).rename(fake.root / "tmp")
        (fake.root / split).mkdir()
        (fake.root / "tmp").rename(fake.root / split / split)
    assert cars_summary(read("cars", fake.root)) == cars_summary(index)


def test_cars_errors(tmp_path):
    with pytest.raises(DataError, match=r"holds neither Stanford Cars layout \(looked for .*devkit/cars_meta\.mat' "
                                        r"and .*cars_annos\.mat'\)"):
        read("cars", tmp_path)
    fake = write_cars_devkit(tmp_path, "root")
    (fake.root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match=r"test labels 'cars_test_annos_withlabels\.mat' are in neither"):
        read("cars", fake.root)
    single = write_cars_single(tmp_path / "single")
    (single.root / "car_ims" / "000005.jpg").unlink()
    with pytest.raises(DataError, match=r"000005\.jpg' listed at .*cars_annos\.mat entry 5 is missing"):
        read("cars", single.root)
    (single.root / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"cars_annos\.mat' cannot be read"):
        read("cars", single.root)


def test_cars_class_out_of_range(tmp_path):
    from scipy.io import loadmat, savemat

    fake = write_cars_single(tmp_path)
    mat = loadmat(fake.root / "cars_annos.mat")
    mat["annotations"][0, 3]["class"] = np.array([[9]], dtype=np.uint8)
    savemat(fake.root / "cars_annos.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(DataError, match=r"cars_annos\.mat entry 4 has class 9 outside 1\.\.3"):
        read("cars", fake.root)


# --- folder ---------------------------------------------------------------------------------------

def test_folder_reads_sorted_classes_and_skips_other_files(tmp_path):
    fake = write_folder(tmp_path)
    index = read("folder", fake.root)
    assert index.class_names == ["cat", "dog", "sea lion"]
    assert [s.label for s in index.train] == [0, 0, 1, 1, 2, 2]
    assert [s.label for s in index.test] == [0, 1, 2]
    assert index.train[1].image_id == "train/cat/cat_1.JPG"  # suffixes in any case
    assert all(s.box is None and s.parts is None for s in index.train)


def test_folder_errors(tmp_path):
    fake = write_folder(tmp_path)
    shutil.copytree(fake.root / "test" / "dog", fake.root / "test" / "wolf")
    with pytest.raises(DataError, match=r"test class folder '.*wolf' has no counterpart"):
        read("folder", fake.root)
    shutil.rmtree(fake.root / "test" / "wolf")
    (fake.root / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*empty' holds no images"):
        read("folder", fake.root)
    with pytest.raises(DataError, match=r"folder '.*train/train' is missing"):
        read("folder", fake.root / "train")


# --- images ---------------------------------------------------------------------------------------

def test_load_rgb_converts_every_mode(tmp_path):
    index = read("folder", write_folder(tmp_path).root)
    cub = read("cub", write_cub(tmp_path).root)
    samples = index.train + index.test + cub.train + cub.test
    modes = set()
    for sample in samples:
        with Image.open(sample.path) as img:
            modes.add(img.mode)
        pixels = load_rgb(sample.path)
        assert pixels.shape == (IMAGE_SIDE[1], IMAGE_SIDE[0], 3) and pixels.dtype == np.uint8
    assert {"L", "CMYK", "P", "RGBA", "RGB"} <= modes  # the fakes really hold every odd mode


def test_load_rgb_cuts_the_aircraft_banner(tmp_path):
    index = read("aircraft", write_aircraft(tmp_path).root)
    sample = index.train[1]
    with Image.open(sample.path) as img:
        assert img.mode == "CMYK"
    full = load_rgb(sample.path)
    cut = load_rgb(sample.path, bottom_crop=index.bottom_crop)
    assert full.shape == (AIRCRAFT_SIZE[1], AIRCRAFT_SIZE[0], 3)
    assert cut.shape == (AIRCRAFT_SIZE[1] - 20, AIRCRAFT_SIZE[0], 3)
    np.testing.assert_array_equal(cut, full[:-20])
    assert full[-20:].mean() > 240 and cut.mean() < 200  # the white banner is gone


def test_load_rgb_names_a_broken_image(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg' cannot be read"):
        load_rgb(broken)
    with pytest.raises(DataError, match="gone.jpg' is missing"):
        load_rgb(tmp_path / "gone.jpg")


def test_cub_part_locations_one_pass_equals_line_by_line(tmp_path):
    from fgvc.data.cub import _part_locations_at_once, _part_locations_by_line, read_table

    fake = write_cub(tmp_path)
    images = read_table(fake.root / "images.txt", 2, "")
    part_ids = [str(p) for p in range(1, 16)]
    path = fake.root / "parts" / "part_locs.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")  # order in the file must not matter
    at_once = _part_locations_at_once(path, images, part_ids)
    assert at_once is not None
    np.testing.assert_array_equal(at_once, _part_locations_by_line(path, images, part_ids, ""))
