"""Joint image/mask transforms, seeded per sample, and batching.

Every transform is a callable ``(image, mask, generator) -> (image, mask)`` on one sample: image
uint8 (3, H, W) (float after :class:`Normalize`), mask int64 (H, W) or None (inference). Geometry
changes both alike; the mask is only ever resampled by nearest neighbour, so no new label values
appear. Randomness comes only from the ``torch.Generator`` passed in; :class:`TransformedDataset`
derives one per sample from (seed, epoch, index), so results do not depend on the number of
DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from trustseg.data.base import IGNORE_INDEX, ClassInfo, Sample, SegmentationDataset
from trustseg.errors import UserError

Tensor = torch.Tensor
Size = int | tuple[int, int]


class JointTransform(Protocol):
    def __call__(self, image: Tensor, mask: Tensor | None, generator: torch.Generator | None = None,
                 ) -> tuple[Tensor, Tensor | None]: ...


# --- pure functions ---------------------------------------------------------------------------------

def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (C, H, W) to ``size`` = (h, w); uint8 in, uint8 out (rounded)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.dtype == torch.uint8 and image.device.type == "cpu":
        # torch's native uint8 kernel (fixed-point, within 1 of the float result) is ~6x faster
        return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    out = F.interpolate(image.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0]
    if image.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of (H, W) to ``size`` = (h, w) by gathering source pixels.

    Each output pixel takes the source pixel containing its centre (``nearest-exact``), so only
    existing label values appear and there is no half-pixel shift against the bilinear image.
    """
    height, width = mask.shape[-2:]
    if (height, width) == tuple(size):
        return mask
    return mask.index_select(-2, _centre_sources(height, size[0])).index_select(-1, _centre_sources(width, size[1]))


def _centre_sources(length: int, out_length: int) -> Tensor:
    """Source index under each output centre, floor((i + 1/2) * length / out_length), in exact integers
    (float rounding would pick either neighbour when a centre lands exactly on a pixel edge)."""
    return (2 * torch.arange(out_length) + 1) * length // (2 * out_length)


def pad_bottom_right(image: Tensor, mask: Tensor | None, size: tuple[int, int],
                     ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor | None]:
    """Pad to at least ``size`` = (h, w) at the bottom/right: image with 0, mask with ``ignore_index``."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
    if mask is not None:
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, mask


def target_size(height: int, width: int, size: Size, keep_ratio: bool = True, factor: float = 1.0) -> tuple[int, int]:
    """Output (h, w) for resizing an image of (height, width).

    ``size`` int: the short side becomes ``size * factor``. A pair with ``keep_ratio``: the largest
    scale at which the long side fits ``max(size) * factor`` and the short side ``min(size) * factor``
    (orientation-free, as mmsegmentation's keep-ratio resize); without ``keep_ratio``: exactly
    ``(size[0] * factor, size[1] * factor)`` as (h, w).
    """
    if isinstance(size, int):
        scale = size * factor / min(height, width)
    elif keep_ratio:
        scale = min(max(size) * factor / max(height, width), min(size) * factor / min(height, width))
    else:
        return max(1, int(size[0] * factor + 0.5)), max(1, int(size[1] * factor + 0.5))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _pair(size: Size, what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise UserError(f"{what}: expected a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def _uniform(generator: torch.Generator | None, low: float, high: float, who: str) -> float:
    if generator is None:
        raise ValueError(f"{who} is random and needs an explicit torch.Generator")
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


# --- training transforms ----------------------------------------------------------------------------

class RandomResizeScale:
    """Resize to ``base_size`` times a ratio drawn uniformly from ``scale_range`` (see :func:`target_size`)."""

    def __init__(self, base_size: Size, scale_range: tuple[float, float] = (0.5, 2.0), keep_ratio: bool = True):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise UserError(f"RandomResizeScale: scale_range must be 0 < low <= high, got {scale_range!r}")
        _pair(base_size, "RandomResizeScale base_size")
        self.base_size, self.scale_range, self.keep_ratio = base_size, tuple(scale_range), keep_ratio

    def __call__(self, image, mask, generator=None):
        ratio = _uniform(generator, *self.scale_range, who="RandomResizeScale")
        size = target_size(*image.shape[-2:], self.base_size, self.keep_ratio, ratio)
        return resize_image(image, size), None if mask is None else resize_mask(mask, size)


class RandomCrop:
    """Random ``size`` crop; smaller images are padded first (image 0, mask ignore).

    With ``cat_max_ratio < 1`` a crop is redrawn while a single class covers ``cat_max_ratio`` or
    more of its labelled pixels, or it shows fewer than two classes; after ``max_tries`` failed
    checks the last draw is used unchecked (mmsegmentation's rule).
    """

    def __init__(self, size: Size, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, max_tries: int = 10):
        self.size = _pair(size, "RandomCrop size")
        self.cat_max_ratio, self.ignore_index, self.max_tries = cat_max_ratio, ignore_index, max_tries

    def _offsets(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        if generator is None:
            raise ValueError("RandomCrop is random and needs an explicit torch.Generator")
        top = int(torch.randint(0, height - self.size[0] + 1, (), generator=generator))
        left = int(torch.randint(0, width - self.size[1] + 1, (), generator=generator))
        return top, left

    def _balanced(self, crop: Tensor) -> bool:
        # numpy: a single-threaded histogram beats torch's ops here (called up to 10x per sample)
        labels = crop.cpu().numpy().ravel()
        counts = np.bincount(labels[labels != self.ignore_index])
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def __call__(self, image, mask, generator=None):
        image, mask = pad_bottom_right(image, mask, self.size, self.ignore_index)
        height, width = image.shape[-2:]
        h, w = self.size
        top, left = self._offsets(height, width, generator)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._balanced(mask[top:top + h, left:left + w]):
                    break
                top, left = self._offsets(height, width, generator)
        crop_mask = None if mask is None else mask[top:top + h, left:left + w]
        return image[..., top:top + h, left:left + w], crop_mask


class RandomHorizontalFlip:
    """Mirror image and mask left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, mask, generator=None):
        if _uniform(generator, 0.0, 1.0, who="RandomHorizontalFlip") >= self.p:
            return image, mask
        return image.flip(-1), None if mask is None else mask.flip(-1)


def _grey(image: Tensor) -> Tensor:
    """ITU-R BT.601 luma of a float (3, H, W) image, (1, H, W)."""
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).unsqueeze(0)


class ColorJitter:
    """Random brightness, contrast and saturation factors from ``[1 - x, 1 + x]``, applied in random order.

    Works on 0..255 images (uint8 stays uint8); the mask is untouched.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise UserError(f"ColorJitter: {name} must be >= 0, got {value}")
        self.amounts = (brightness, contrast, saturation)

    def __call__(self, image, mask, generator=None):
        if generator is None:
            raise ValueError("ColorJitter is random and needs an explicit torch.Generator")
        out = image.float()
        for op in torch.randperm(3, generator=generator).tolist():
            amount = self.amounts[op]
            if amount == 0:
                continue
            factor = _uniform(generator, max(0.0, 1.0 - amount), 1.0 + amount, who="ColorJitter")
            if op == 0:
                out = out * factor
            elif op == 1:
                mean = _grey(out).mean()
                out = (out - mean) * factor + mean
            else:
                grey = _grey(out)
                out = (out - grey) * factor + grey
            out = out.clamp(0, 255)
        if image.dtype == torch.uint8:
            out = out.round().to(torch.uint8)
        return out, mask


# --- deterministic transforms -----------------------------------------------------------------------

class Resize:
    """Resize to ``size``: int = short side; pair = exactly (h, w), or with ``keep_ratio`` the
    largest size that fits the (long, short) bounds (see :func:`target_size`)."""

    def __init__(self, size: Size, keep_ratio: bool = False):
        _pair(size, "Resize size")
        self.size, self.keep_ratio = size, keep_ratio

    def __call__(self, image, mask, generator=None):
        size = target_size(*image.shape[-2:], self.size, self.keep_ratio)
        return resize_image(image, size), None if mask is None else resize_mask(mask, size)


class PadTo:
    """Pad at the bottom/right to a ``multiple`` of each side or to a fixed ``size`` (image 0, mask ignore)."""

    def __init__(self, multiple: int | None = None, size: Size | None = None, ignore_index: int = IGNORE_INDEX):
        if (multiple is None) == (size is None):
            raise UserError("PadTo: give exactly one of multiple= or size=")
        if multiple is not None and (not isinstance(multiple, int) or multiple < 1):
            raise UserError(f"PadTo: multiple must be a positive int, got {multiple!r}")
        self.multiple = multiple
        self.size = None if size is None else _pair(size, "PadTo size")
        self.ignore_index = ignore_index

    def __call__(self, image, mask, generator=None):
        height, width = image.shape[-2:]
        if self.size is not None:
            if height > self.size[0] or width > self.size[1]:
                raise UserError(f"PadTo: image {height}x{width} (HxW) is larger than the pad size "
                                f"{self.size[0]}x{self.size[1]}; resize or crop first")
            size = self.size
        else:
            m = self.multiple
            size = (-(-height // m) * m, -(-width // m) * m)
        return pad_bottom_right(image, mask, size, self.ignore_index)


class Normalize:
    """uint8 0..255 image -> float32 ``(image / 255 - mean) / std``; ``mean``/``std`` in 0..1 units."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"Normalize: expected 3 means and 3 positive stds, got mean={mean!r} std={std!r}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, mask, generator=None):
        return (image.float() / 255.0 - self.mean) / self.std, mask


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[JointTransform]):
        self.transforms = list(transforms)

    def __call__(self, image, mask, generator=None):
        for transform in self.transforms:
            image, mask = transform(image, mask, generator)
        return image, mask


def train_transform(crop_size: Size, *, base_size: Size | None = None, scale_range: tuple[float, float] = (0.5, 2.0),
                    cat_max_ratio: float = 0.75, color_jitter: float = 0.0,
                    mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                    ignore_index: int = IGNORE_INDEX) -> Compose:
    """The usual training pipeline: random rescale, crop (cat_max_ratio), flip, optional jitter, normalise.

    Without ``base_size`` the images are not rescaled.
    """
    steps: list[JointTransform] = []
    if base_size is not None:
        steps.append(RandomResizeScale(base_size, scale_range))
    steps += [RandomCrop(crop_size, cat_max_ratio, ignore_index), RandomHorizontalFlip()]
    if color_jitter > 0:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter))
    steps.append(Normalize(mean, std))
    return Compose(steps)


def eval_transform(*, size: Size | None = None, pad_multiple: int | None = None,
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   ignore_index: int = IGNORE_INDEX) -> Compose:
    """Deterministic evaluation pipeline: optional resize, optional pad to a multiple, normalise."""
    steps: list[JointTransform] = []
    if size is not None:
        steps.append(Resize(size))
    if pad_multiple is not None:
        steps.append(PadTo(multiple=pad_multiple, ignore_index=ignore_index))
    steps.append(Normalize(mean, std))
    return Compose(steps)


# --- dataset wrapper and batching -------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64 finaliser (Steele, Lea & Flood 2014): nearby inputs give unrelated 64-bit outputs
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, unrelated to those of neighbouring samples/epochs."""
    mixed = _splitmix64(seed & _MASK64)
    mixed = _splitmix64(mixed ^ (epoch & _MASK64))
    mixed = _splitmix64(mixed ^ (index & _MASK64))
    return mixed >> 1


class TransformedDataset:
    """A dataset whose samples pass through ``transform`` with a generator seeded by (seed, epoch, index).

    Indices past the end wrap around (``index % len``) with a seed of their own, for samples drawn
    repeatedly within one epoch.

    Call :meth:`set_epoch` before iterating each epoch. The epoch lives in shared memory, so DataLoader
    workers see it too, even persistent ones.
    """

    def __init__(self, dataset: SegmentationDataset, transform: JointTransform, seed: int = 0,
                 crop_transform: Callable[[Size], JointTransform] | None = None):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        # multi-resolution training: items (index, crop height, crop width) pass through the
        # transform that crops to that size (built once per size)
        self.crop_transform, self._by_crop = crop_transform, {}
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def classes(self) -> ClassInfo:
        return self.dataset.classes

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int, int]) -> Sample:
        index, transform = item, self.transform
        if isinstance(item, tuple):
            index, crop = item[0], (item[1], item[2])
            if crop not in self._by_crop:
                self._by_crop[crop] = self.crop_transform(crop)
            transform = self._by_crop[crop]
        # index + r * len(self) is sample `index` drawn again in the same epoch (weighted sampling of
        # combined datasets): the same sample with an augmentation of its own
        sample = self.dataset[index % len(self.dataset)]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        image, mask = transform(sample["image"], sample["mask"], generator)
        return {"image": image, "mask": mask, "path": sample["path"]}


def collate(samples: Sequence[Sample]) -> dict:
    """Stack samples into ``{"image": (B, 3, H, W), "mask": (B, H, W), "path": [...]}``.

    ``mask`` is None when no sample has one. Samples of different sizes are a user error. Samples that
    carry their dataset ``index`` keep it as a list.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    first = samples[0]
    for sample in samples[1:]:
        if sample["image"].shape != first["image"].shape:
            a, b = first["image"].shape[-2:], sample["image"].shape[-2:]
            raise UserError(
                f"cannot batch {first['path']} ({a[1]}x{a[0]}) with {sample['path']} ({b[1]}x{b[0]}) (W x H): "
                f"samples in a batch must have one size; add a Resize/RandomCrop/PadTo transform or use batch size 1"
            )
    masks = [sample["mask"] for sample in samples]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("collate: some samples have masks and some do not")
    batch = {
        "image": torch.stack([sample["image"] for sample in samples]),
        "mask": None if masks[0] is None else torch.stack(masks),
        "path": [sample["path"] for sample in samples],
    }
    if "index" in first:
        batch["index"] = [sample["index"] for sample in samples]
    return batch


def collate_by_size(samples: Sequence[Sample]) -> list[dict]:
    """Batches of one image size each, as :func:`collate` makes them, for data of mixed sizes.

    Samples are grouped by their image shape in order of first appearance, keeping their order within
    a group. Evaluation uses this instead of padding: padding changes what a global model (a ViT's
    attention, a pooled context) sees, so only same-size batches give the logits of batch size 1.
    """
    groups: dict[tuple[int, ...], list[Sample]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample["image"].shape), []).append(sample)
    return [collate(group) for group in groups.values()]
