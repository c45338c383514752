"""The prediction gallery of an evaluation: for a few images, image | ground truth | prediction | error |
uncertainty side by side, saved as PNGs with an index the report reads (``gallery/index.json``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trustseg.data.base import ClassInfo, SegmentationDataset
from trustseg.engine.checkpoint import atomic_write
from trustseg.report.visualize import colorize, heatmap, overlay, save_png

GALLERY_INDEX = "gallery/index.json"
COLUMNS = "image | ground truth | prediction | error (red: wrong, green: right, black: ignored) | uncertainty (normalised entropy, bright: uncertain)"
_RIGHT, _WRONG = (40, 170, 60), (220, 30, 30)


def error_map(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """(H, W) label maps -> RGB uint8 (H, W, 3): green where right, red where wrong, black where the
    target is not a class (ignored)."""
    pred, target = pred.cpu().numpy(), target.cpu().numpy()
    colours = np.zeros((*target.shape, 3), dtype=np.uint8)
    labelled = (target >= 0) & (target < num_classes)
    colours[labelled & (pred == target)] = _RIGHT
    colours[labelled & (pred != target)] = _WRONG
    return colours


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over classes divided by log K: (K, H, W) -> (H, W) in [0, 1]."""
    log_probs = logits.double().log_softmax(0)
    entropy = -(log_probs.exp() * log_probs).sum(0)
    return entropy / math.log(logits.shape[0]) if logits.shape[0] > 1 else torch.zeros_like(entropy)


def gallery_panel(image: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, classes: ClassInfo) -> np.ndarray:
    """image (3, H, W) uint8, target (H, W), logits (K, H, W) -> the five panels with white gutters."""
    pred = logits.max(0).indices
    gutter = np.full((image.shape[-2], 4, 3), 255, dtype=np.uint8)
    panels = [image.cpu().permute(1, 2, 0).numpy(), overlay(image, colorize(target, classes)),
              overlay(image, colorize(pred, classes)), error_map(pred, target, classes.num_classes),
              heatmap(normalised_entropy(logits).cpu().numpy())]
    row = [panels[0]]
    for panel in panels[1:]:
        row += [gutter, panel]
    return np.concatenate(row, axis=1)


def write_gallery(predictor: Callable[[torch.Tensor], torch.Tensor], dataset: SegmentationDataset, folder: Path,
                  count: int, device: torch.device | str = "cpu") -> list[Path]:
    """Panels of the first `count` labelled images of `dataset` in ``folder/gallery/`` and their index."""
    folder = Path(folder)
    entries, paths = [], []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        if sample["mask"] is None:
            continue
        with torch.inference_mode():
            logits = predictor(sample["image"][None].to(device))[0].float().cpu()
        name = f"gallery/{index:03d}.png"
        paths.append(save_png(gallery_panel(sample["image"], sample["mask"], logits, dataset.classes), folder / name))
        entries.append({"file": name, "caption": Path(str(sample["path"])).name})
    text = json.dumps({"columns": COLUMNS, "images": entries}, indent=2) + "\n"
    atomic_write(folder / GALLERY_INDEX, lambda handle: handle.write(text.encode()))
    return paths
