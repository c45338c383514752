"""The datasets of a training run: augmented train set, plain val set, and class weights from the masks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import Subset

from trustseg.data.base import ClassInfo, SegmentationDataset
from trustseg.data.combined import CombinedDataset, Mixture
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.data.transforms import TransformedDataset, train_transform
from trustseg.engine.distributed import is_distributed, shard_indices
from trustseg.errors import UserError
from trustseg.engine.progress import track
from trustseg.training.config import TrainConfig
from trustseg.training.losses import class_statistics, class_weights


@dataclass
class TrainData:
    train: TransformedDataset  # augmented, normalised crops
    raw_train: SegmentationDataset  # the same samples untouched (class statistics)
    val: SegmentationDataset  # uint8 images; the predictor normalises
    classes: ClassInfo
    mixture: Mixture | None = None  # sampling weights of a combined train set (``A+B#ratio=...``)


def val_spec(config: TrainConfig) -> tuple[str, str | None]:
    """(spec, split override): the explicit val spec keeps its own split (default val); else train's, split=val."""
    if config.data.val is None:
        return config.data.train, "val"
    return config.data.val, resolve_split(config.data.val, None, "val")


def load_train_data(config: TrainConfig) -> TrainData:
    data = config.data
    raw_train = load_dataset(data.train)
    spec, split = val_spec(config)
    val = load_dataset(spec, split=split)
    classes = raw_train.classes
    if val.classes.num_classes != classes.num_classes:
        raise UserError(f"data.val {spec!r} has {val.classes.num_classes} classes "
                        f"but data.train has {classes.num_classes}")
    transform_to = partial(train_transform, base_size=data.base_size, scale_range=data.scale,
                           cat_max_ratio=data.cat_max_ratio, color_jitter=data.color_jitter, mean=data.mean,
                           std=data.std, ignore_index=classes.ignore_index)
    mixture = raw_train.mixture if isinstance(raw_train, CombinedDataset) else None
    train = TransformedDataset(raw_train, transform_to(data.crop), seed=config.seed, crop_transform=transform_to)
    return TrainData(train, raw_train, val, classes, mixture)


def compute_class_weights(
    method: str | tuple[float, ...], dataset: SegmentationDataset, *, progress: bool = True,
    device: torch.device = torch.device("cpu"),
) -> torch.Tensor | None:
    """Per-class loss weights (K,) on ``device`` for ``loss.class_weights``; None for "none".

    Statistics come from the untransformed train masks; under torchrun each process reads a shard and
    the counts are summed (on ``device``, where the process group's backend sums), so every process
    gets the same weights.
    """
    num_classes, ignore = dataset.classes.num_classes, dataset.classes.ignore_index
    if isinstance(method, tuple):
        if len(method) != num_classes:
            raise UserError(f"loss.class_weights has {len(method)} values but the dataset has {num_classes} classes "
                            f"({', '.join(dataset.classes.names)})")
        return torch.tensor(method, dtype=torch.float32, device=device)
    if method == "none":
        return None
    counts = torch.zeros(2, num_classes, dtype=torch.int64)
    shard = Subset(dataset, list(shard_indices(len(dataset))))
    for index in track(range(len(shard)), total=len(shard), description="class weights", enabled=progress):
        pixels, image_pixels = class_statistics(shard[index]["mask"], num_classes, ignore)
        counts[0] += pixels
        counts[1] += image_pixels
    if is_distributed():
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
    if not bool(counts[0].any()):
        raise UserError("loss.class_weights: the train masks hold no labelled pixels")
    return class_weights(method, counts[0].cpu(), counts[1].cpu()).to(device)
