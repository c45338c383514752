"""What every dataset returns, and the class metadata that travels with it.

A sample is a dict ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "path": str}``; masks use
``ignore_index`` for pixels that count nowhere. Datasets map their on-disk label conventions (CamVid's
11, ADE20K's 0, Cityscapes' label ids) to this once, on load.

The ignore label is 255 for up to 255 classes (8-bit masks) and 65535 for 256..65535 classes (16-bit
masks, where 255 is a class): :func:`ignore_index_for` is the one place that decides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

import numpy as np
import torch
from torch.utils.data import Subset

IGNORE_INDEX = 255
WIDE_IGNORE_INDEX = 65535
MAX_CLASSES = WIDE_IGNORE_INDEX


def ignore_index_for(num_classes: int) -> int:
    """The ignore label of a dataset with `num_classes` classes: the largest value of its mask dtype."""
    return IGNORE_INDEX if num_classes <= IGNORE_INDEX else WIDE_IGNORE_INDEX


def mask_dtype(num_classes: int) -> np.dtype:
    """The unsigned dtype that stores a mask of `num_classes` classes and its ignore label: 8 or 16 bits."""
    return np.dtype(np.uint8 if ignore_index_for(num_classes) <= IGNORE_INDEX else np.uint16)


class Sample(TypedDict):
    image: torch.Tensor  # uint8 (3, H, W)
    mask: torch.Tensor  # int64 (H, W), values in [0, K) or ignore_index
    path: str


@dataclass(frozen=True)
class ClassInfo:
    """Class names, RGB palette (one colour per class) and the ignore label of a dataset.

    ``ignore_index`` None means the convention :func:`ignore_index_for` (255, or 65535 above 255 classes).
    """

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = None  # type: ignore[assignment]  # resolved in __post_init__

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(f"{len(self.names)} class names but {len(self.palette)} palette colours")
        if self.ignore_index is None:
            object.__setattr__(self, "ignore_index", ignore_index_for(len(self.names)))
        if 0 <= self.ignore_index < len(self.names):
            raise ValueError(f"ignore_index {self.ignore_index} is one of the {len(self.names)} class indices")

    @property
    def num_classes(self) -> int:
        return len(self.names)


class SegmentationDataset(Protocol):
    """Map-style dataset of segmentation samples with class metadata."""

    classes: ClassInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...


def subset(dataset: SegmentationDataset, indices: Sequence[int]) -> SegmentationDataset:
    """The samples at `indices`, keeping the class metadata (torch's Subset drops it)."""
    part = Subset(dataset, indices)
    part.classes = dataset.classes
    return part
