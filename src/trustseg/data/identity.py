"""Which source each sample of a dataset comes from, without decoding it: to tell whether two datasets
share images (e.g. calibrators fitted on the images they are then evaluated on).

File datasets: the resolved image path (symbolic links and relative paths resolve to one name).
Synthetic data: (seed, split, index), the three numbers a scene's random draws are seeded by.
Slices (`images=...`, `first_images`) map through to the samples they select. Any other dataset
falls back to each sample's ``path``, which reads the sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.utils.data import Subset

from trustseg.data.base import SegmentationDataset


def sample_sources(dataset: SegmentationDataset) -> list[str]:
    """One string per sample naming where it comes from, in the dataset's order."""
    if isinstance(dataset, Subset):
        inner = sample_sources(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    pairs = getattr(dataset, "pairs", None)
    if pairs is not None:
        return [str(Path(image).resolve()) for image, _ in pairs]
    synthetic = sys.modules.get("trustseg.data.synthetic")  # imported lazily: if absent, no dataset is one
    if synthetic is not None and isinstance(dataset, synthetic.SyntheticDataset):
        return [f"synthetic scene seed={dataset.seed} split={dataset.split} index={i}" for i in range(len(dataset))]
    return [str(dataset[i]["path"]) for i in range(len(dataset))]


def shared_sources(first: SegmentationDataset, second: SegmentationDataset) -> list[str]:
    """The sources of `first`'s samples that are also samples of `second`, in `first`'s order."""
    seen = set(sample_sources(second))
    return [source for source in sample_sources(first) if source in seen]
