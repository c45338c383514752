"""Shared by the CLI-level tests: run `trustseg ...` in-process, and a tiny U-Net checkpoint."""

import sys

import pytest
import torch

from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.cli import main
from trustseg.data.base import ClassInfo
from trustseg.models.factory import build_model

THREE_CLASSES = ClassInfo(names=("zero", "one", "two"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))


def run_cli(args, monkeypatch) -> int:
    """Run ``trustseg *args`` as the console script does; return its exit status."""
    monkeypatch.setattr(sys, "argv", ["trustseg", *args])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code


def save_tiny_unet(path, classes: ClassInfo = THREE_CLASSES, seed: int = 0) -> torch.nn.Module:
    """Write an untrained U-Net (base width 4, depth 2) checkpoint; return the model in eval mode."""
    torch.manual_seed(seed)
    options = {"base_width": 4, "depth": 2}
    model = build_model("unet", num_classes=classes.num_classes, **options)
    save_checkpoint(Checkpoint({"name": "unet", "options": options}, model.state_dict(), classes), path)
    return model.eval()


def folder_tree(root, classes: ClassInfo = THREE_CLASSES):
    """The empty skeleton of a ``folder:`` dataset at ``root``: images/, masks/ and classes.txt."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes.names))
    return root


# Sizes (H, W) that interleave, so every batch of 4 mixes sizes and equal sizes are not neighbours.
MIXED_SIZES = ((12, 16), (20, 14), (9, 11), (12, 16), (20, 14), (17, 23), (12, 16))


def mixed_size_folder(root, sizes=MIXED_SIZES, classes: ClassInfo = THREE_CLASSES, seed: int = 0):
    """A ``folder:`` dataset whose images have the given (H, W) sizes, random pixels and labels
    (including some ignored pixels)."""
    import numpy as np
    from PIL import Image

    folder_tree(root, classes)
    rng = np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(
            root / "images" / f"img{i:02d}.png")
        labels = rng.integers(0, classes.num_classes, (height, width)).astype(np.uint8)
        labels[rng.random((height, width)) < 0.1] = 255
        Image.fromarray(labels, "L").save(root / "masks" / f"img{i:02d}.png")
    return root


def banded_folder(root, num_images: int, height: int = 32, width: int = 40, seed: int = 0,
                  boundaries: tuple[int, int] | None = None):
    """A ``folder:`` dataset of three-class scenes a tiny model can learn: class 1 right of a column, class 2
    in the lower half right of a second column, the top two rows ignored; each image carries its labels'
    colours (halved) plus noise. The columns are `boundaries` in every image, or by default column 10 + i
    (moving one pixel per image) and column 22."""
    import numpy as np
    from PIL import Image

    folder_tree(root)
    rng = np.random.default_rng(seed)
    palette = np.array(THREE_CLASSES.palette, np.uint8)
    for i in range(num_images):
        mask = np.zeros((height, width), np.uint8)
        first, second = boundaries or (10 + i, 22)
        mask[:, first:] = 1
        mask[height // 2:, second:] = 2
        mask[:2] = 255
        image = palette[np.minimum(mask, 2)] // 2 + rng.integers(0, 100, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root
