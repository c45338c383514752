"""Which samples each training step sees: a pure function of (seed, step, rank, world size).

Every epoch is a fresh permutation of the train set seeded by (seed, epoch); step ``s`` takes the
global batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete tail batch is
dropped, so every epoch has the same number of steps) and process ``r`` takes the strided share
``batch[r::world_size]``. Resuming at step ``s`` therefore needs nothing but ``s``, and N processes
together see exactly the batches one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from trustseg.data.transforms import sample_seed

# Stream ids that keep the seeds of different uses of randomness apart.
ORDER_STREAM = 0x0D0E
MODEL_STREAM = 0x5EED


def epoch_permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (int64 (length,)) in which epoch ``epoch`` visits the train set."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, ORDER_STREAM))
    return torch.randperm(length, generator=generator)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG for training step ``step`` on process ``rank`` (dropout, drop path)."""
    return sample_seed(seed ^ MODEL_STREAM, step, rank)


class EpochBatches(Sampler[list[int]]):
    """This process's index batches for steps ``first_step ..`` to the end of their epoch."""

    def __init__(
        self, length: int, batch_size: int, *, seed: int, first_step: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        self.steps_per_epoch = length // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"train set of {length} samples is smaller than one batch of {batch_size}")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = divmod(first_step, self.steps_per_epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.offset

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.length, self.seed, self.epoch)
        for j in range(self.offset, self.steps_per_epoch):
            batch = order[j * self.batch_size : (j + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size].tolist()
