"""Helpers that write image and label files the way the real datasets store them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 12, 16
# Real datasets (ADE20K, VOC, FoodSeg103) hold images of many sizes: sample i of a fake tree has size_of(i).
SIZES = ((H, W), (17, 11), (9, 20))


def size_of(index: int) -> tuple[int, int]:
    return SIZES[index % len(SIZES)]


def write_image(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    """Random RGB image saved as PNG or JPEG (by suffix); returns the pixels written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return pixels


def write_mask(path: Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    """8-bit label PNG: grey ("L"), or palette ("P") when a palette is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    mode = "L" if palette is None else "P"
    picture = Image.frombytes(mode, (labels.shape[1], labels.shape[0]), labels.tobytes())
    if palette is not None:
        picture.putpalette(palette)
    picture.save(path)


def write_mask16(path: Path, labels: np.ndarray) -> None:
    """16-bit grey label PNG, as datasets with more than 255 classes store them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16)).save(path)


def label_grid(values: list[int], size: tuple[int, int] = (H, W), dtype=np.uint8) -> np.ndarray:
    """A mask that cycles through ``values`` pixel by pixel, so every value occurs."""
    count = size[0] * size[1]
    return np.resize(np.array(values, dtype=dtype), count).reshape(size)



CITYSCAPES_FILES = {
    "train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
    "val": [("frankfurt", "frankfurt_000000_000294")],
}
VOC_IDS = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
VOC_LABELS = [0, 1, 15, 20, 255]


def voc_palette() -> list[int]:
    # any distinct colours will do: the loader must read the indices, not these colours
    return [(i * 37 + c * 91) % 256 for i in range(256) for c in range(3)]


# Trees in the real layouts; ``sizes`` maps a split to one (height, width) per image, so a tree can mix
# image sizes as the real datasets do.
Sizes = dict[str, list[tuple[int, int]]]


def ade20k_tree(root: Path, sizes: Sizes) -> Path:
    """ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/.../*.png with raw labels 0..150."""
    for split, folder in (("train", "training"), ("val", "validation")):
        for i, size in enumerate(sizes.get(split, [])):
            stem = f"ADE_{split}_{i + 1:08d}"
            write_image(root / "images" / folder / f"{stem}.jpg", seed=i, size=size)
            write_mask(root / "annotations" / folder / f"{stem}.png", label_grid(list(range(151)), size))
    return root


def cityscapes_tree(root: Path, sizes: Sizes, files: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png and gtFine/.../*_gtFine_labelIds.png (raw ids 0..33);
    ``files`` names the (city, stem) of each image, by default made up."""
    for split, size_list in sizes.items():
        for i, size in enumerate(size_list):
            city, stem = files[split][i] if files else (("aachen", "bochum")[i % 2], f"city_{i:06d}_000019")
            write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i, size=size)
            labels = root / "gtFine" / split / city
            write_mask(labels / f"{stem}_gtFine_labelIds.png", label_grid(list(range(34)), size))
            # the other gtFine files sit beside the label ids in the real release
            write_mask(labels / f"{stem}_gtFine_instanceIds.png", label_grid([0], size))
    return root


def foodseg103_tree(root: Path, sizes: Sizes, labels: tuple[int, ...] = (0, 1, 58, 103)) -> Path:
    """FoodSeg103/Images/{img_dir,ann_dir}/{train,test}/; returns the FoodSeg103 folder."""
    images = root / "FoodSeg103" / "Images"
    for split, size_list in sizes.items():
        for i, size in enumerate(size_list):
            write_image(images / "img_dir" / split / f"{i:08d}.jpg", seed=i, size=size)
            write_mask(images / "ann_dir" / split / f"{i:08d}.png", label_grid(list(labels), size))
    return root / "FoodSeg103"
