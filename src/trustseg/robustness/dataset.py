"""Corrupted views of a dataset, produced on the fly (never stored): per sample in the DataLoader
(`CorruptedDataset`, CPU workers), or per batch on the batch's device (`corrupt_batch`, a GPU).

Each image is corrupted with its own generator seeded by (seed, condition, index), so an image gets
the same corruption whatever the batch size, the number of DataLoader workers or torchrun processes,
and on either path (the random draws are made on the CPU generator in both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trustseg.data.base import ClassInfo, Sample, SegmentationDataset
from trustseg.data.transforms import sample_seed
from trustseg.robustness.corruptions import CORRUPTIONS, check_corruption, corrupt
from trustseg.robustness.summary import CLEAN


def condition_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The generator seed of one image under one (corruption, severity) condition."""
    condition = list(CORRUPTIONS).index(name) * 8 + severity
    return sample_seed(seed, condition, index)


class CorruptedDataset:
    """``dataset`` with every image corrupted by ``name`` at ``severity``; geometric corruptions move
    the mask with the image."""

    def __init__(self, dataset: SegmentationDataset, name: str, severity: int, seed: int = 0) -> None:
        check_corruption(name, severity)
        self.dataset, self.name, self.severity, self.seed = dataset, name, severity, seed

    @property
    def classes(self) -> ClassInfo:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        generator = torch.Generator().manual_seed(condition_seed(self.seed, self.name, self.severity, index))
        mask = sample["mask"]
        image, moved = corrupt(sample["image"][None], self.name, self.severity, generator,
                               None if mask is None else mask[None])
        return {"image": image[0], "mask": None if moved is None else moved[0], "path": sample["path"]}


def corrupted_view(dataset: SegmentationDataset, key: str, *, seed: int, device: torch.device,
                   in_loader: bool | None = None,
                   ) -> tuple[SegmentationDataset, Callable[[dict[str, Any]], dict[str, Any]] | None]:
    """(data, batch transform) for `evaluate()` under condition `key` ("clean" or "name/severity"): with
    `in_loader` (default: on the CPU) DataLoader workers corrupt per sample; otherwise each batch is
    corrupted on its device. Both give the same images."""
    if key == CLEAN:
        return dataset, None
    name, severity = key.split("/")
    if device.type == "cpu" if in_loader is None else in_loader:
        return CorruptedDataset(dataset, name, int(severity), seed=seed), None
    return dataset, corrupt_batch(name, int(severity), seed=seed)


def corrupt_batch(name: str, severity: int, seed: int = 0) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A batch transform for `evaluate()` that corrupts a batch where it lies, e.g. on the GPU, each image
    with the generator `CorruptedDataset` would give it (from the batch's ``"index"`` list)."""
    check_corruption(name, severity)

    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        generators = [torch.Generator().manual_seed(condition_seed(seed, name, severity, index))
                      for index in batch["index"]]
        image, mask = corrupt(batch["image"], name, severity, generators, batch["mask"])
        return {**batch, "image": image, "mask": mask}

    return transform
