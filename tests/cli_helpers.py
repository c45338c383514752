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
