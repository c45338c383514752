"""What the calibrators are fitted on, collected by one pass of the shared evaluation loop.

Pixel-wise methods get a uniform sample of the labelled pixels of the fit data, whatever the number or
size of its images: every labelled pixel draws a random key and the `max_pixels` largest keys are kept
(reservoir sampling with random keys, a bounded top-k). Spatial methods (LTS, IBTS) get random crops of
at most `crop_size` x `crop_size` pixels with their image and label map: `crops_per_image` candidate
crops per image (at most as many as would tile it), each with a key, the `max_crops` largest kept. Memory is therefore bounded by
max_pixels x (4 K + 16) B plus max_crops x crop_size² x (4 K + 11) B, not by the data: for Cityscapes
(K = 19) with the defaults (10^6 pixels, 64 crops of 512²) 88 MiB + 1.36 GiB, where keeping 64 whole
1024x2048 logit maps with their images and masks took 11 GiB (benchmarks/RESULTS.md: measured peaks).

A pixel's key and a crop's place depend only on the seed, the image's path and the position, never on
the batch size, the order or the process: under torchrun each process keeps the top keys of its shard
and `all_reduce` merges the shards by key, which gives exactly the one-process sample.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from trustseg.data.base import SegmentationDataset
from trustseg.engine.evaluate import evaluate
from trustseg.errors import UserError
from trustseg.metrics.base import Predictions, as_predictions, check_batch, check_ignore_index

Crop = tuple[float, Tensor, Tensor, Tensor]  # key, logits (K, h, w) float32, image (3, h, w), mask (h, w)


@dataclass
class FitData:
    """What the calibrators are fitted on: pixel rows for pixel-wise methods, crops for spatial ones."""

    logits: Tensor  # (N, K) float32, labelled pixels only
    labels: Tensor  # (N,) int64 in [0, K)
    maps: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # crops: (logits, image, mask)
    images: int = 0
    labelled_pixels: int = 0


def sample_seed(seed: int, path: str) -> int:
    """The generator seed of one image's keys: a stable hash of (seed, path), the same in every process."""
    digest = hashlib.blake2b(f"{seed}\0{path}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def keep_largest(k: int, keys: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """The (at most) `k` entries with the largest `keys`, and the same rows of each of `values`."""
    top = keys.topk(min(k, keys.numel())).indices
    return (keys[top], *(v[top] for v in values))


class FitDataCollector:
    """An accumulator of the evaluation loop that keeps a bounded uniform sample of the fit data.

    Accumulators see (predictions, target); this one also needs each image and its path (the crops
    hold the image, the keys are seeded by the path), so `evaluate` is given `observe` as its
    `batch_transform`, which remembers the batch the next `update` belongs to (see `collect_fit_data`).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, *, max_pixels: int = 1_000_000,
                 max_crops: int = 0, crop_size: int = 512, crops_per_image: int = 1, seed: int = 0) -> None:
        check_ignore_index(num_classes, ignore_index)
        for name, value, least in (("max_pixels", max_pixels, 0), ("max_crops", max_crops, 0),
                                   ("crop_size", crop_size, 1), ("crops_per_image", crops_per_image, 1)):
            if not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be an integer >= {least}, got {value!r}")
        self.num_classes, self.ignore_index, self.seed = num_classes, ignore_index, seed
        self.max_pixels, self.max_crops = max_pixels, max_crops
        self.crop_size, self.crops_per_image = crop_size, crops_per_image
        self.keys = torch.empty(0, dtype=torch.float64)
        self.rows = torch.empty(0, num_classes)
        self.labels = torch.empty(0, dtype=torch.int64)
        self.crops: list[Crop] = []
        self.images = 0
        self.labelled_pixels = 0
        self._batch: dict[str, Any] | None = None
        self._synced = False

    @property
    def config(self) -> dict[str, Any]:
        """Everything that must agree for two collectors to be merged."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "seed": self.seed,
                "max_pixels": self.max_pixels, "max_crops": self.max_crops, "crop_size": self.crop_size,
                "crops_per_image": self.crops_per_image}

    def observe(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`evaluate`'s batch_transform: remember the batch (images, paths) and return it unchanged."""
        if batch["mask"] is None:
            raise UserError(f"fit image {batch['path'][0]} has no label map: calibration needs labels")
        self._batch = batch
        return batch

    def update(self, outputs: Tensor | Predictions, target: Tensor) -> None:
        """Add one batch: logits (B, K, H, W) and labels (B, H, W) of the batch last `observe`d."""
        if self._synced:
            raise UserError("FitDataCollector was already summed over processes (all_reduce); it takes no more batches")
        batch, self._batch = self._batch, None
        if batch is None:
            raise RuntimeError("FitDataCollector.update needs the batch: pass batch_transform=collector.observe")
        preds = as_predictions(outputs)
        check_batch(preds, target, self.num_classes)
        if preds.logits is None:
            raise UserError("fitting calibrators needs the model's logits, not hard predictions")
        # the kept tensors feed autograd when fitting, so they must not be inference tensors
        with torch.inference_mode(False), torch.no_grad():
            for logits, image, mask, path in zip(preds.logits, batch["image"], target, batch["path"]):
                self._add_image(logits, image, mask, str(path))

    def _add_image(self, logits: Tensor, image: Tensor, mask: Tensor, path: str) -> None:
        K, ignore = self.num_classes, self.ignore_index
        mask, image = mask.to(logits.device), image.to(logits.device)  # the sample lives with the logits
        valid = (mask != ignore).flatten()
        if bool((((mask < 0) | (mask >= K)).flatten() & valid).any()):
            raise UserError(f"fit image {path} has labels outside [0, {K}) other than {ignore}")
        generator = torch.Generator().manual_seed(sample_seed(self.seed, path))
        keys = torch.rand(mask.numel(), generator=generator, dtype=torch.float64).to(logits.device)
        index = valid.nonzero().squeeze(1)
        self.images += 1
        self.labelled_pixels += index.numel()
        if self.max_pixels:
            self._add_pixels(keys[index], index, logits.flatten(1), mask.flatten())
        if self.max_crops:
            self._add_crops(logits, image, mask, generator)

    def _add_pixels(self, keys: Tensor, index: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Merge one image's labelled pixels (keys, flat indices into logits (K, HW) and labels (HW,))."""
        kept, n = self.keys.numel(), self.max_pixels
        device = logits.device
        if kept == n:  # full: only keys above the smallest kept one can enter
            above = keys > self.keys.min()
            keys, index = keys[above], index[above]
        if keys.numel() == 0:
            return
        keys, index = keep_largest(n, keys, index)
        if kept < n:  # still filling: the reservoir is smaller than n, a concatenation is cheap
            self.keys, self.rows, self.labels = keep_largest(
                n, torch.cat((self.keys.to(device), keys)), torch.cat((self.rows.to(device), logits[:, index].T.float())),
                torch.cat((self.labels.to(device), labels[index])))
            return
        # full: the newcomers overwrite the evicted entries in place, so memory stays at n rows
        survivors = torch.zeros(n + keys.numel(), dtype=torch.bool, device=device)
        survivors[torch.cat((self.keys, keys)).topk(n).indices] = True
        evicted = (~survivors[:n]).nonzero().squeeze(1)
        entering = survivors[n:].nonzero().squeeze(1)
        self.keys[evicted] = keys[entering]
        self.rows[evicted] = logits[:, index[entering]].T.float()
        self.labels[evicted] = labels[index[entering]]

    def _add_crops(self, logits: Tensor, image: Tensor, mask: Tensor, generator: torch.Generator) -> None:
        _, H, W = logits.shape
        h, w = min(self.crop_size, H), min(self.crop_size, W)
        # no more candidates than crops that would tile the image (one if the crop is the whole image):
        # more would hold overlapping copies of the same pixels
        for _ in range(min(self.crops_per_image, math.ceil(H * W / (h * w)))):
            # every draw happens whether or not the crop is kept, so later draws never depend on the sample
            key = float(torch.rand((), generator=generator, dtype=torch.float64))
            top = int(torch.randint(H - h + 1, (), generator=generator))
            left = int(torch.randint(W - w + 1, (), generator=generator))
            if len(self.crops) == self.max_crops and key <= self.crops[-1][0]:
                continue
            window = mask[top:top + h, left:left + w]
            if not bool((window != self.ignore_index).any()):
                continue  # no labelled pixel: nothing to fit on
            # copies, so that a crop does not keep the whole logit map alive
            self.crops.append((key, logits[:, top:top + h, left:left + w].to(torch.float32, copy=True),
                               image[:, top:top + h, left:left + w].clone(), window.clone()))
            self.crops.sort(key=lambda crop: -crop[0])
            del self.crops[self.max_crops:]

    def merge(self, other: FitDataCollector) -> FitDataCollector:
        """Merge `other`'s sample into this one by key (in place): the sample of both shards together."""
        if other.config != self.config:
            raise UserError(f"cannot merge FitDataCollector({other.config}) into FitDataCollector({self.config})")
        device = self.rows.device
        self.keys, self.rows, self.labels = keep_largest(
            self.max_pixels, torch.cat((self.keys, other.keys.to(device))),
            torch.cat((self.rows, other.rows.to(device))), torch.cat((self.labels, other.labels.to(device))))
        self.crops = sorted(self.crops + other.crops, key=lambda crop: -crop[0])[:self.max_crops]
        self.images += other.images
        self.labelled_pixels += other.labelled_pixels
        return self

    def all_reduce(self) -> FitDataCollector:
        """Merge the samples of all processes into every process (no-op unless distributed); once only, as
        an accumulator's sums are summed once."""
        if self._synced:
            raise UserError("FitDataCollector was already summed over processes (all_reduce); merging twice would "
                            "double the sample")
        if dist.is_available() and dist.is_initialized():
            device = self.rows.device
            shards: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(shards, self._cpu_copy())
            merged = FitDataCollector(**self.config)
            for shard in shards:
                merged.merge(shard)
            merged.to(device)
            self.keys, self.rows, self.labels, self.crops = merged.keys, merged.rows, merged.labels, merged.crops
            self.images, self.labelled_pixels = merged.images, merged.labelled_pixels
        self._synced = True
        return self

    def to(self, device: torch.device | str) -> FitDataCollector:
        """Keep the sample on `device`, that of the logits it is drawn from."""
        self.keys, self.rows, self.labels = (t.to(device) for t in (self.keys, self.rows, self.labels))
        self.crops = [(key, *(t.to(device) for t in tensors)) for key, *tensors in self.crops]
        return self

    def _cpu_copy(self) -> FitDataCollector:
        copy = FitDataCollector(**self.config)
        copy.keys, copy.rows, copy.labels = self.keys.cpu(), self.rows.cpu(), self.labels.cpu()
        copy.crops = [(key, *(t.cpu() for t in tensors)) for key, *tensors in self.crops]
        copy.images, copy.labelled_pixels = self.images, self.labelled_pixels
        return copy

    def compute(self) -> dict[str, int]:
        """Counts for the run's record (the sample itself is `fit_data()`)."""
        return {"fit_images": self.images, "fit_labelled_pixels": self.labelled_pixels,
                "fit_sample_pixels": int(self.keys.numel()), "fit_crops": len(self.crops)}

    def fit_data(self) -> FitData:
        """The sample, in descending key order (so it does not depend on the order images came in)."""
        order = self.keys.argsort(descending=True)
        return FitData(self.rows[order], self.labels[order], [tuple(crop[1:]) for crop in self.crops],
                       self.images, self.labelled_pixels)


def collect_fit_data(
    predictor,
    dataset: SegmentationDataset,
    *,
    max_pixels: int = 1_000_000,
    max_crops: int = 0,
    crop_size: int = 512,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> FitData:
    """Run `predictor` (on `device`) over `dataset` once (the shared evaluation loop, sharded under
    torchrun) and keep a uniform sample of `max_pixels` labelled pixels and `max_crops` crops."""
    if len(dataset) == 0:
        raise UserError("the fit data is empty: calibrators need held-out labelled images")
    classes = dataset.classes
    collector = FitDataCollector(classes.num_classes, classes.ignore_index, max_pixels=max_pixels,
                                 max_crops=max_crops, crop_size=crop_size,
                                 crops_per_image=max(1, math.ceil(max_crops / len(dataset))), seed=seed)
    evaluate(predictor, dataset, [collector], batch_transform=collector.observe, progress=progress,
             description="fit data", device=device)
    if collector.labelled_pixels == 0:
        raise UserError("the fit data has no labelled pixels (every pixel is ignore_index)")
    return collector.fit_data()
