"""Tiny dataset trees in the real on-disk layouts and file formats, written with Pillow; sample i of
each split has size ``size_of(i)`` (several sizes, as in the real datasets), and every label value of
the layout occurs (ADE20K: all 150 classes and 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_trees import (CITYSCAPES_FILES, VOC_IDS, VOC_LABELS, label_grid, size_of, voc_palette, write_image,
                        write_mask)


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
    root = tmp_path / "cityscapes"
    for split, items in CITYSCAPES_FILES.items():
        for i, (city, stem) in enumerate(items):
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i, size=size_of(i))
            write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                       label_grid(list(range(34)), size_of(i)))
            # the other gtFine files sit beside the label ids in the real release
            write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", label_grid([0], size_of(i)))
    return root


@pytest.fixture
def ade20k_root(tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for split, folder, count in (("train", "training", 3), ("val", "validation", 2)):
        for i in range(count):
            stem = f"ADE_{split}_{i + 1:08d}"
            write_image(root / "images" / folder / f"{stem}.jpg", seed=i, size=size_of(i))
            write_mask(root / "annotations" / folder / f"{stem}.png", label_grid(list(range(151)), size_of(i)))
    return root


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
    images = tmp_path / "FoodSeg103" / "Images"
    for split, count in (("train", 3), ("test", 2)):
        for i in range(count):
            write_image(images / "img_dir" / split / f"{i:08d}.jpg", seed=i, size=size_of(i))
            write_mask(images / "ann_dir" / split / f"{i:08d}.png", label_grid([0, 1, 58, 103], size_of(i)))
    return tmp_path / "FoodSeg103"


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "mydata"
    for i, suffix in enumerate((".png", ".jpg", ".JPEG")):
        write_image(root / "images" / f"img{i}{suffix}", seed=i, size=size_of(i))
        write_mask(root / "masks" / f"img{i}.png", label_grid([0, 1, 2, 255][: 2 + i], size_of(i)))
    return root
