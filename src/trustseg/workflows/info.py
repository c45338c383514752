"""`trustseg info`: split sizes and class pixel frequencies of a dataset (table + bar plot)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trustseg.data.base import ClassInfo
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.errors import UserError
from trustseg.engine.progress import track
from trustseg.report.pages import write_run_report
from trustseg.report.plots import bar_plot
from trustseg.engine.rundir import RunDir

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class InfoConfig:
    data: str
    out: str
    split: str | None = None  # None: the spec's split, else "train"
    progress: bool = True


@dataclass
class InfoResult:
    split: str
    split_sizes: dict[str, int]
    classes: ClassInfo
    pixel_counts: list[int]
    ignored_pixels: int
    run_dir: Path

    @property
    def frequencies(self) -> list[float]:
        """Share of labelled (non-ignored) pixels per class."""
        total = sum(self.pixel_counts)
        return [count / total if total else 0.0 for count in self.pixel_counts]


def split_sizes(spec: str) -> dict[str, int]:
    """Number of samples in each split that exists (missing splits are left out)."""
    sizes = {}
    for split in SPLITS:
        try:
            sizes[split] = len(load_dataset(spec, split=split))
        except UserError:
            continue
    return sizes


def class_pixel_counts(dataset, *, progress: bool) -> tuple[list[int], int]:
    """Pixels per class and ignored pixels, streamed one mask at a time."""
    num_classes, ignore = dataset.classes.num_classes, dataset.classes.ignore_index
    counts = torch.zeros(num_classes + 1, dtype=torch.int64)
    for index in track(range(len(dataset)), total=len(dataset), description="count pixels", enabled=progress):
        mask = dataset[index]["mask"].flatten()
        counts += torch.bincount(torch.where(mask == ignore, num_classes, mask), minlength=num_classes + 1)
    return counts[:num_classes].tolist(), int(counts[num_classes])


def run_info(config: InfoConfig) -> InfoResult:
    split = resolve_split(config.data, config.split, "train")
    dataset = load_dataset(config.data, split=split)
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "info", **vars(config)})
    counts, ignored = class_pixel_counts(dataset, progress=config.progress)
    result = InfoResult(split, split_sizes(config.data), dataset.classes, counts, ignored, run_dir.path)
    info: dict[str, Any] = {
        "data": config.data,
        "split": split,
        "split_sizes": result.split_sizes,
        "num_classes": dataset.classes.num_classes,
        "ignore_index": dataset.classes.ignore_index,
        "ignored_pixels": ignored,
        "per_class": {
            "name": list(dataset.classes.names),
            "pixels": counts,
            "frequency": result.frequencies,
        },
    }
    run_dir.write_json("info.json", info)
    bar_plot(
        dataset.classes.names,
        [100 * f for f in result.frequencies],
        run_dir.file("class_frequencies.png"),
        title=f"Class pixel frequency ({split})",
        ylabel="% of labelled pixels (log)",
        colors=[tuple(v / 255 for v in c) for c in dataset.classes.palette],
        log_scale=True,
    )
    write_run_report(run_dir.path)
    return result
