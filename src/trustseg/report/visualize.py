"""Colour masks, overlays and heatmaps for looking at predictions (uint8 arrays, saved as PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trustseg.data.base import ClassInfo
from trustseg.engine.checkpoint import atomic_write


def colorize(mask: torch.Tensor, classes: ClassInfo) -> np.ndarray:
    """Class-index mask (H, W) -> RGB uint8 (H, W, 3); ignore and unknown labels are black."""
    k = classes.num_classes
    lookup = np.zeros((k + 1, 3), dtype=np.uint8)  # row k: black for every other label
    lookup[:k] = np.asarray(classes.palette, dtype=np.uint8)
    indices = mask.detach().cpu().numpy()
    return lookup[np.where((indices >= 0) & (indices < k), indices, k)]


def overlay(image: torch.Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an image uint8 (3, H, W) with a colour mask (H, W, 3)."""
    rgb = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)
    return (rgb * (1 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)


def heatmap(values: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3) through a matplotlib colormap (0 dark, 1 bright)."""
    from matplotlib import colormaps  # lazy: matplotlib takes ~0.5 s to import

    return colormaps[colormap](np.clip(values, 0, 1), bytes=True)[..., :3]


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    picture = Image.fromarray(array)
    atomic_write(path, lambda handle: picture.save(handle, format="PNG"))
    return path


def prediction_panel(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, classes: ClassInfo) -> np.ndarray:
    """Side by side: image | ground truth overlay | prediction overlay, with white gutters."""
    height = image.shape[-2]
    gutter = np.full((height, 4, 3), 255, dtype=np.uint8)
    rgb = image.detach().cpu().permute(1, 2, 0).numpy()
    panels = [rgb, overlay(image, colorize(target, classes)), overlay(image, colorize(pred, classes))]
    return np.concatenate([panels[0], gutter, panels[1], gutter, panels[2]], axis=1)
