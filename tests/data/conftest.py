"""Tiny dataset trees in the real on-disk layouts and file formats, written with Pillow."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_trees import (
    CITYSCAPES_FILES,
    VOC_IDS,
    VOC_LABELS,
    H,
    W,
    ade20k_tree,
    cityscapes_tree,
    foodseg103_tree,
    label_grid,
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
            write_image(root / split / f"{name}.png", seed=i)
            write_mask(root / f"{split}annot" / f"{name}.png", label_grid(list(range(12))))
    return root


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    sizes = {split: [(H, W)] * len(items) for split, items in CITYSCAPES_FILES.items()}
    return cityscapes_tree(tmp_path / "cityscapes", sizes, CITYSCAPES_FILES)


@pytest.fixture
def ade20k_root(tmp_path: Path) -> Path:
    return ade20k_tree(tmp_path / "ADEChallengeData2016", {"train": [(H, W)] * 3, "val": [(H, W)] * 2})


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for split, ids in VOC_IDS.items():
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, sample_id in enumerate(ids):
            write_image(root / "JPEGImages" / f"{sample_id}.jpg", seed=k)
            write_mask(root / "SegmentationClass" / f"{sample_id}.png", label_grid(VOC_LABELS), voc_palette())
    return root


@pytest.fixture
def foodseg_root(tmp_path: Path) -> Path:
    return foodseg103_tree(tmp_path, {"train": [(H, W)] * 3, "test": [(H, W)] * 2})


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    for i, suffix in enumerate((".png", ".jpg", ".JPEG")):
        write_image(root / "images" / f"img{i}{suffix}", seed=i)
        write_mask(root / "masks" / f"img{i}.png", label_grid([0, 1, 2, 255][: 2 + i]))
    return root
