"""The one evaluation loop: every command that measures a model (clean, corrupted, calibrated,
compressed, adapted) runs its predictor over a dataset through here, streaming into accumulators.

Memory stays bounded: per batch the logits are reduced into the accumulators' sums and dropped.
Images of different sizes may share a loader batch: it is split into same-size batches (never padded),
so the metrics of any batch size equal those of batch size 1.
Under torchrun each process evaluates a strided shard and the accumulators are summed at the end.
Batches and accumulators live on the predictor's device; only the final sums come back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from trustseg.data.base import SegmentationDataset
from trustseg.data.transforms import collate_by_size
from trustseg.engine.devices import loader_options, to_device
from trustseg.engine.distributed import shard_indices
from trustseg.errors import UserError
from trustseg.metrics.base import as_predictions
from trustseg.engine.progress import track

Batch = dict[str, Any]


def evaluate(
    predictor: Callable[[torch.Tensor], Any],
    dataset: SegmentationDataset,
    accumulators: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    batch_size: int = 1,
    batch_transform: Callable[[Batch], Batch] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    description: str = "eval",
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Run `predictor` (images (B,3,H,W) -> logits (B,K,H,W), or `Predictions`) over `dataset`; return merged metrics.

    `batch_transform` changes a collated batch, already on `device`, before prediction (e.g. corrupts
    images on the fly); ``batch["index"]`` lists the samples' indices in `dataset`. `device` is where the predictor runs: batches and accumulators are moved there.
    Returned dict: the accumulators' flat keys, with their ``per_class`` tables merged.

    Several models' outputs can share one pass over the data (e.g. every calibrator of one base
    model): `accumulators` is then a mapping name -> accumulators, the predictor returns a mapping
    name -> logits, and the result maps each name to its merged metrics.
    """
    if len(dataset) == 0:
        raise UserError("cannot evaluate on an empty dataset")
    device = torch.device(device)
    named = isinstance(accumulators, Mapping)
    groups = accumulators if named else {"": accumulators}
    for group in groups.values():
        for accumulator in group:
            accumulator.to(device)
    shard = _IndexedShard(dataset, shard_indices(len(dataset)))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_by_size,
                        **loader_options(device))
    with torch.inference_mode():
        for same_size_batches in track(loader, total=len(loader), description=description, enabled=progress):
            for batch in same_size_batches:
                batch = to_device(batch, device)
                if batch_transform is not None:
                    batch = batch_transform(batch)
                outputs = predictor(batch["image"])
                outputs = outputs if named else {"": outputs}
                for name, group in groups.items():
                    predictions = as_predictions(outputs[name])
                    for accumulator in group:
                        accumulator.update(predictions, batch["mask"])
    results = {name: _merged(group) for name, group in groups.items()}
    return results if named else results[""]


class _IndexedShard:
    """This process's samples of `dataset`, each carrying its index in `dataset` (``"index"``), so a batch
    transform can seed per image whatever the batch, the shard or the process."""

    def __init__(self, dataset: SegmentationDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        return {**self.dataset[index], "index": index}


def _merged(accumulators: Sequence[Any]) -> dict[str, Any]:
    """Sum the accumulators over processes and merge their results into one flat dict."""
    results: dict[str, Any] = {"per_class": {}}
    for accumulator in accumulators:
        accumulator.all_reduce()
        computed = dict(accumulator.compute())
        results["per_class"].update(computed.pop("per_class", {}))
        results.update(computed)
    return results
