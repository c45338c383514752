"""`trustseg eval`: a checkpoint on a dataset, streamed through the one evaluation loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustseg.checkpoint import Checkpoint, load_checkpoint
from trustseg.data.base import ClassInfo, SegmentationDataset, subset
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.errors import UserError
from trustseg.evaluate import evaluate
from trustseg.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.boundary import BoundaryIoU
from trustseg.metrics.confusion import ConfusionMatrix, PerImageIoU
from trustseg.report.tables import metrics_markdown
from trustseg.rundir import RunDir


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str
    data: str
    out: str
    split: str | None = None  # None: the spec's split, else "val"
    batch_size: int = 1
    max_images: int | None = None
    inference: InferenceConfig = InferenceConfig()
    boundary_iou: bool = True
    progress: bool = True


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    classes: ClassInfo
    run_dir: Path


def check_same_classes(checkpoint: Checkpoint, dataset: SegmentationDataset, spec: str) -> None:
    """The model and the data must agree on the number of classes (names may differ in spelling)."""
    expected, found = checkpoint.classes.num_classes, dataset.classes.num_classes
    if expected != found:
        raise UserError(f"data {spec!r} has {found} classes but the checkpoint was trained with {expected}")


def first_images(dataset: SegmentationDataset, max_images: int | None) -> SegmentationDataset:
    """The first `max_images` samples (all when None), keeping the class metadata."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    if max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {max_images}")
    return subset(dataset, range(max_images))


def default_accumulators(classes: ClassInfo, *, boundary_iou: bool = True) -> list[Any]:
    """The metrics every evaluation reports."""
    accumulators: list[Any] = [
        ConfusionMatrix(classes.num_classes, ignore_index=classes.ignore_index),
        PerImageIoU(classes.num_classes, ignore_index=classes.ignore_index),
    ]
    if boundary_iou:
        accumulators.append(BoundaryIoU(classes.num_classes, ignore_index=classes.ignore_index))
    return accumulators


def run_eval(config: EvalConfig) -> EvalResult:
    checkpoint = load_checkpoint(config.checkpoint)
    dataset = first_images(load_dataset(config.data, split=resolve_split(config.data, config.split, "val")), config.max_images)
    check_same_classes(checkpoint, dataset, config.data)
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "eval", **vars(config)})
    predictor = predictor_from_checkpoint(checkpoint, config.inference)
    metrics = evaluate(
        predictor,
        dataset,
        default_accumulators(checkpoint.classes, boundary_iou=config.boundary_iou),
        batch_size=config.batch_size,
        progress=config.progress,
    )
    metrics["num_images"] = len(dataset)
    metrics["class_names"] = list(checkpoint.classes.names)
    run_dir.write_metrics(metrics)
    (run_dir.file("report.md")).write_text(
        metrics_markdown(metrics, checkpoint.classes.names, f"Evaluation of {config.checkpoint} on {config.data}")
    )
    return EvalResult(metrics=metrics, classes=checkpoint.classes, run_dir=run_dir.path)
