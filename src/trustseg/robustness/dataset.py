"""Corrupted views of a dataset, produced on the fly (never stored): per sample in the DataLoader
(`CorruptedDataset`, CPU workers), or per batch on the batch's device (`corrupt_batch`, a GPU).

Each image is corrupted with its own generator seeded by (seed, condition, index), so an image gets
the same corruption whatever the batch size, the number of DataLoader workers or torchrun processes,
and on either path (the random draws are made on the CPU generator in both).

`MixedCorruptionDataset` gives each image its own condition (clean or a corruption at a severity), for
calibrators fitted under shift (Tomani et al., CVPR 2021).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trustseg.data.base import ClassInfo, Sample, SegmentationDataset
from trustseg.data.transforms import sample_seed
from trustseg.errors import UserError
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


# the draw of a fit image's condition has its own stream, apart from the corruptions' own randomness
_MIX_STREAM = 0x66697400  # "fit\0"


def mixed_condition(index: int, corruptions: tuple[str, ...], severities: tuple[int, ...], seed: int) -> str:
    """The condition of image `index` in a mixed-corruption view: ``clean`` or ``name/severity``.

    As in Tomani et al. (CVPR 2021), clean is one level among the severities, each level equally likely
    (level 0 = clean, else a severity, with a corruption drawn uniformly); the draw depends only on
    (seed, index), so it is the same in every process and for any batch size.
    """
    generator = torch.Generator().manual_seed(sample_seed(seed, _MIX_STREAM, index))
    level = int(torch.randint(len(severities) + 1, (), generator=generator))
    if level == 0:
        return CLEAN
    name = corruptions[int(torch.randint(len(corruptions), (), generator=generator))]
    return f"{name}/{severities[level - 1]}"


class MixedCorruptionDataset:
    """``dataset`` with each image under its own condition drawn by `mixed_condition` (clean, or one of
    `corruptions` at one of `severities`), corrupted exactly as `CorruptedDataset` corrupts it under that
    condition; it reads nothing but ``dataset``."""

    def __init__(self, dataset: SegmentationDataset, corruptions: tuple[str, ...], severities: tuple[int, ...],
                 seed: int = 0) -> None:
        if not corruptions or not severities:
            raise UserError("a mixed-corruption view needs at least one corruption and one severity")
        for name in corruptions:
            for severity in severities:
                check_corruption(name, severity)
        self.dataset, self.corruptions, self.severities, self.seed = dataset, corruptions, severities, seed

    @property
    def classes(self) -> ClassInfo:
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.dataset)

    def condition(self, index: int) -> str:
        return mixed_condition(index, self.corruptions, self.severities, self.seed)

    def __getitem__(self, index: int) -> Sample:
        key = self.condition(index)
        if key == CLEAN:
            return self.dataset[index]
        name, severity = key.split("/")
        return CorruptedDataset(self.dataset, name, int(severity), seed=self.seed)[index]
