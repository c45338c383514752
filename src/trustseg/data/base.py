"""What every dataset returns, and the class metadata that travels with it.

A sample is a dict ``{"image": uint8 (3, H, W), "mask": int64 (H, W), "path": str}``; masks use
``ignore_index`` (255 unless a dataset says otherwise) for pixels that count nowhere. Datasets map
their on-disk label conventions (CamVid's 11, ADE20K's 0, Cityscapes' label ids) to this once, on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

import torch
from torch.utils.data import Subset

IGNORE_INDEX = 255


class Sample(TypedDict):
    image: torch.Tensor  # uint8 (3, H, W)
    mask: torch.Tensor  # int64 (H, W), values in [0, K) or ignore_index
    path: str


@dataclass(frozen=True)
class ClassInfo:
    """Class names, RGB palette (one colour per class) and the ignore label of a dataset."""

    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if len(self.names) != len(self.palette):
            raise ValueError(f"{len(self.names)} class names but {len(self.palette)} palette colours")

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
