"""Which samples each training step sees: a pure function of (seed, step, rank, world size).

Every epoch is a fresh permutation of the train set seeded by (seed, epoch); step ``s`` takes the
global batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete tail batch is
dropped, so every epoch has the same number of steps) and process ``r`` takes the strided share
``batch[r::world_size]``. Resuming at step ``s`` therefore needs nothing but ``s``, and N processes
together see exactly the batches one process would.

A combined train set with sampling weights (``A+B#ratio=3:1``, a :class:`~trustseg.data.combined.Mixture`)
keeps the epoch length (the total number of samples) but fills each epoch with fixed quotas per part,
``ratio_i / sum(ratio)`` of it (largest remainders). Part i's draws continue one stream across epochs
that walks through fresh shuffles of that part, so an oversampled part repeats every sample equally
often and an undersampled one still reaches all its samples over the epochs; the epoch's draws are then
shuffled together. All of it is a function of (seed, epoch) alone, like the plain permutation. A sample
drawn several times in one epoch comes as ``index + r * length``, r the pass over its part (counted from
the first pass the epoch touches), which :class:`~trustseg.data.transforms.TransformedDataset` reads as
``index`` with an augmentation seed of its own, so repeats are augmented differently.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from trustseg.data.combined import Mixture
from trustseg.data.transforms import sample_seed

# Stream ids that keep the seeds of different uses of randomness apart.
ORDER_STREAM = 0x0D0E
MODEL_STREAM = 0x5EED
SCALE_STREAM = 0x5CA1


def epoch_permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (int64 (length,)) in which epoch ``epoch`` visits the train set."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, ORDER_STREAM))
    return torch.randperm(length, generator=generator)


def quotas(total: int, ratio: tuple[float, ...]) -> list[int]:
    """Integers proportional to `ratio` that sum to `total` (largest remainders, ties to the first part)."""
    shares = [total * r / sum(ratio) for r in ratio]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(ratio)), key=lambda i: counts[i] - shares[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _stream(length: int, seed: int, part: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``start .. start + count`` of part ``part``'s endless stream of fresh permutations of ``length``,
    and the pass (0, 1, ...) over the part, counted from the first of these draws, that each belongs to."""
    first, last = start // length, (start + count - 1) // length
    stream_seed = sample_seed(seed, part, ORDER_STREAM)
    cycles = [epoch_permutation(length, stream_seed, cycle) for cycle in range(first, last + 1)]
    offset = start - first * length
    passes = torch.arange(len(cycles)).repeat_interleave(length)
    return torch.cat(cycles)[offset : offset + count], passes[offset : offset + count]


def epoch_order(length: int, seed: int, epoch: int, mixture: Mixture | None = None) -> torch.Tensor:
    """The samples (int64 (length,)) of epoch ``epoch``, in order: indices into the whole train set, plus
    ``r * length`` for the r-th pass over a part within the epoch (only with a `mixture`, see above)."""
    if mixture is None:
        return epoch_permutation(length, seed, epoch)
    if sum(mixture.lengths) != length:
        raise ValueError(f"mixture parts hold {sum(mixture.lengths)} samples, the train set {length}")
    draws, offset = [], 0
    for part, (size, count) in enumerate(zip(mixture.lengths, quotas(length, mixture.ratio))):
        if count:
            indices, passes = _stream(size, seed, part, epoch * count, count)
            # each pass is a permutation, so (index, pass) is unique within the epoch
            repeats = passes - (passes[0] if indices.numel() else 0)
            draws.append(indices + offset + repeats * length)
        offset += size
    drawn = torch.cat(draws)
    return drawn[epoch_permutation(length, seed, epoch)]


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG for training step ``step`` on process ``rank`` (dropout, drop path)."""
    return sample_seed(seed ^ MODEL_STREAM, step, rank)


class EpochBatches(Sampler[list[int]]):
    """This process's index batches for steps ``first_step ..`` to the end of their epoch."""

    def __init__(
        self, length: int, batch_size: int, *, seed: int, first_step: int, rank: int = 0, world_size: int = 1,
        mixture: Mixture | None = None,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        self.steps_per_epoch = length // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train set of {length} samples is smaller than one batch of {batch_size}")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.mixture = rank, world_size, mixture
        self.epoch, self.offset = divmod(first_step, self.steps_per_epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.offset

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.length, self.seed, self.epoch, self.mixture)
        for j in range(self.offset, self.steps_per_epoch):
            batch = order[j * self.batch_size : (j + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()


def scaled_shape(factor: float, *, batch_size: int, crop: tuple[int, int], divisor: int,
                 world_size: int = 1) -> tuple[int, tuple[int, int]]:
    """(global batch, crop) at crop scale ``factor``: the crop is a multiple of the model's stride
    ``divisor``, and the batch holds about as many pixels as ``batch_size`` crops of ``crop`` (a
    multiple of the number of processes), as the Active Spatial Guidance code keeps batch x size^2
    about constant."""
    size = tuple(max(divisor, round(side * factor / divisor) * divisor) for side in crop)
    batch = round(batch_size * crop[0] * crop[1] / (size[0] * size[1]) / world_size) * world_size
    return max(world_size, batch), size


class MultiScaleBatches(Sampler[list[tuple[int, int, int]]]):
    """Like :class:`EpochBatches`, but each step has its own crop scale and batch size (:func:`scaled_shape`):
    items are ``(index, crop height, crop width)``. Steps take consecutive slices of the epoch's order;
    an epoch ends when the next step's batch no longer fits in it. Where step ``first_step`` starts is
    found by replaying the batch sizes of the steps before it, so resuming needs nothing but the step."""

    def __init__(self, length: int, batch_size: int, *, crop: tuple[int, int], scales: tuple[float, ...],
                 divisor: int, seed: int, first_step: int, rank: int = 0, world_size: int = 1,
                 mixture: Mixture | None = None) -> None:
        self.length, self.seed, self.rank, self.world_size, self.mixture = length, seed, rank, world_size, mixture
        self.shapes = [scaled_shape(f, batch_size=batch_size, crop=crop, divisor=divisor, world_size=world_size)
                       for f in scales]
        largest = max(batch for batch, _ in self.shapes)
        if largest > length:
            raise ValueError(f"train set of {length} samples is smaller than one batch of {largest} at the smallest "
                             "crop scale")
        self.epoch, self.cursor, self.first_step = 0, 0, first_step
        for step in range(first_step + 1):  # replay; the last round only moves to first_step's epoch
            batch = self.shape(step)[0]
            if self.cursor + batch > length:
                self.epoch, self.cursor = self.epoch + 1, 0
            if step < first_step:
                self.cursor += batch

    def shape(self, step: int) -> tuple[int, tuple[int, int]]:
        """(global batch, crop) of step ``step``: one of the scales, drawn from (seed, step)."""
        return self.shapes[sample_seed(self.seed, step, SCALE_STREAM) % len(self.shapes)]

    def _steps(self) -> Iterator[tuple[int, int, tuple[int, int]]]:
        """(step, start in the epoch's order, (batch, crop)) of each step left in this epoch."""
        step, cursor = self.first_step, self.cursor
        while cursor + (shape := self.shape(step))[0] <= self.length:
            yield step, cursor, shape
            step, cursor = step + 1, cursor + shape[0]

    def __len__(self) -> int:
        return sum(1 for _ in self._steps())

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = epoch_order(self.length, self.seed, self.epoch, self.mixture)
        for _, start, (batch, (height, width)) in self._steps():
            indices = order[start : start + batch][self.rank :: self.world_size].tolist()
            yield [(index, height, width) for index in indices]
