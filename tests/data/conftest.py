"""Tiny dataset trees in the real on-disk layouts and file formats, written with Pillow; sample i of
each split has size ``size_of(i)`` (several sizes, as in the real datasets), and every label value of
the layout occurs (ADE20K: all 150 classes and 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_trees import (
    CITYSCAPES_FILES,
    VOC_IDS,
    VOC_LABELS,
    ade20k_tree,
    cityscapes_tree,
    foodseg103_tree,
    label_grid,
    size_of,
    voc_palette,
    write_image,
    write_mask,
)


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    root = tmp_path / "camvid"
    splits = {"train": ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"], "val": ["0016E5_07959", "0016E5_07961"]}
    for split, names in splits.items():
        for i, name in enumerate(names):
            write_image(root / split / f"{name}.png", seed=i, size=size_of(i))
            write_mask(root / f"{split}annot" / f"{name}.png", label_grid(list(range(12)), size_of(i)))
    return root


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    sizes = {split: [size_of(i) for i in range(len(items))] for split, items in CITYSCAPES_FILES.items()}
    return cityscapes_tree(tmp_path / "cityscapes", sizes, CITYSCAPES_FILES)


@pytest.fixture
def ade20k_root(tmp_path: Path) -> Path:
    return ade20k_tree(tmp_path / "ADEChallengeData2016",
                       {"train": [size_of(i) for i in range(3)], "val": [size_of(i) for i in range(2)]})


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in VOC_IDS.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, sample_id in enumerate(ids):
            write_image(root / "JPEGImages" / f"{sample_id}.jpg", seed=k, size=size_of(k))
            write_mask(root / "SegmentationClass" / f"{sample_id}.png", label_grid(VOC_LABELS, size_of(k)),
                       voc_palette())
    return root


@pytest.fixture
def foodseg_root(tmp_path: Path) -> Path:
    return foodseg103_tree(tmp_path, {"train": [size_of(i) for i in range(3)], "test": [size_of(i) for i in range(2)]})


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    for i, suffix in enumerate((".png", ".jpg", ".JPEG")):
        write_image(root / "images" / f"img{i}{suffix}", seed=i, size=size_of(i))
        write_mask(root / "masks" / f"img{i}.png", label_grid([0, 1, 2, 255][: 2 + i], size_of(i)))
    return root
