"""NABirds (Van Horn et al. 2015): 555 North American bird categories, 23,929 train / 24,633 test
images, one box and 11 part keypoints per image.

The archive `nabirds.tar.gz` unpacks to `nabirds/`, laid out like CUB-200-2011 but with UUID image
ids, 0-based part ids, and class ids from a 1,011-node taxonomy (classes.txt lists every node,
images use only the 555 leaves). The leaf ids used by images are mapped to labels 0..554 in
increasing numeric order, so the mapping depends on nothing but the files. A few boxes reach
beyond their image; they are kept as written and clipped by the transform.
"""

from __future__ import annotations

from pathlib import Path

from fgvc.data.cub import read_cub_layout
from fgvc.data.records import DATASETS, DatasetIndex, find_root

NABIRDS_FOLDER = "nabirds"  # what the archive unpacks to
NABIRDS_HINT = ("download nabirds.tar.gz from the Cornell Lab of Ornithology's NABirds page, unpack it "
                "and set data.root to its nabirds folder (the one holding images.txt).")


@DATASETS.register("nabirds")
def read_nabirds(root: Path) -> DatasetIndex:
    """NABirds with its official split, boxes and 11 parts; leaf classes mapped to 0..K-1."""
    root = find_root(root, "images.txt", [NABIRDS_FOLDER], NABIRDS_HINT)
    return read_cub_layout(root, "nabirds", NABIRDS_HINT)
