"""Several datasets with one class table read as one: ``SPEC+SPEC`` (e.g. real + synthetic data, two
slices of one dataset, two datasets labelled alike), with optional sampling weights for training.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from trustseg.data.base import ClassInfo, Sample, SegmentationDataset
from trustseg.errors import UserError


@dataclass(frozen=True)
class Mixture:
    """How training draws from the parts of a combined dataset: part i (``lengths[i]`` samples, the
    parts in order) supplies ``ratio[i] / sum(ratio)`` of every epoch's samples, cycling through its own
    shuffled samples as often as that needs (see `trustseg.training.sampling`)."""

    lengths: tuple[int, ...]
    ratio: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.lengths) != len(self.ratio) or len(self.lengths) < 2:
            raise ValueError(f"a mixture needs one weight per part, got {self.ratio} for {len(self.lengths)} parts")


class CombinedDataset:
    """The samples of `parts` one after another (part 0 first), with their shared class table.

    `names` (the parts' specs) only serve error messages. `mixture` carries the training sampling
    weights when the spec gave ``ratio=``; evaluation reads every sample once, whatever the ratio.
    """

    def __init__(self, parts: Sequence[SegmentationDataset], names: Sequence[str],
                 ratio: Sequence[float] | None = None) -> None:
        check_same_classes(parts, names)
        self.parts, self.names = list(parts), list(names)
        self.classes: ClassInfo = parts[0].classes
        self.lengths = tuple(len(part) for part in parts)
        self._ends = list(accumulate(self.lengths))
        self.mixture = None if ratio is None else Mixture(self.lengths, tuple(float(r) for r in ratio))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self._ends, index)
        return self.parts[part][index - (self._ends[part - 1] if part else 0)]

    def __repr__(self) -> str:
        return f"CombinedDataset({' + '.join(self.names)}, {len(self)} samples)"


def check_same_classes(parts: Sequence[SegmentationDataset], names: Sequence[str]) -> None:
    """Every part must have the first part's class names, in the same order (so the same ids)."""
    first = parts[0].classes
    for part, name in zip(parts[1:], names[1:]):
        other = part.classes
        if other.names == first.names:
            continue
        if other.num_classes != first.num_classes:
            difference = f"{first.num_classes} classes but {name!r} has {other.num_classes}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(first.names, other.names)) if a != b)
            difference = f"class {i} named {first.names[i]!r} but {name!r} names it {other.names[i]!r}"
        raise UserError(f"data spec parts disagree on classes: {names[0]!r} has {difference}; combined parts "
                        f"need the same class table (e.g. the same classes.txt)")
