"""`trustseg eval`: a checkpoint on a dataset, streamed through the one evaluation loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustseg.engine.checkpoint import Checkpoint, load_checkpoint
from trustseg.data.base import ClassInfo, SegmentationDataset, subset
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.errors import UserError
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_main_process
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.boundary import BoundaryIoU
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import ConfusionMatrix, PerImageConfusion, PerImageIoU
from trustseg.metrics.uncertainty import UncertaintyHistogram
from trustseg.report.gallery import write_gallery
from trustseg.report.pages import CONFUSION_FILE, PER_IMAGE_CONFUSION_FILE, write_array, write_run_report
from trustseg.engine.rundir import RunDir
from trustseg.metrics.base import Predictions
from trustseg.refine.refiner import refinement_cost
from trustseg.engine.uncertainty_maps import MC_MEASURES, SCORED_MEASURES, mc_dropout, mc_dropout_maps, require_dropout
from trustseg.workflows.prediction import check_mc_samples, dropout_fix


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
    calibration: bool = True
    uncertainty: tuple[str, ...] = ("msp",)  # measures scored as misclassification detectors
    mc_samples: int = 8  # stochastic passes per batch for the MC-dropout measures
    seed: int = 0  # of the MC-dropout masks, the same for every batch (as in `trustseg predict`)
    device: str = "auto"
    progress: bool = True
    per_image: bool = False  # also write per_image_confusion.npy (N, K, K), for bootstrap comparisons
    gallery: int = 4  # images shown in the report's prediction gallery
    report: bool = True  # write report.md / report.html at the end

    def __post_init__(self) -> None:
        check_mc_samples(self.mc_samples)


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


def checkpoint_and_data(checkpoint_path: str, data: str, split: str | None, max_images: int | None,
                        default_split: str = "val") -> tuple[Checkpoint, SegmentationDataset, str | None]:
    """The checkpoint, the first `max_images` of the data it runs on, checked to share its classes, and the
    split read (`split`, else the spec's, else `default_split`)."""
    checkpoint = load_checkpoint(checkpoint_path)
    split = resolve_split(data, split, default_split)
    dataset = first_images(load_dataset(data, split=split), max_images)
    check_same_classes(checkpoint, dataset, data)
    return checkpoint, dataset, split


def first_images(dataset: SegmentationDataset, max_images: int | None) -> SegmentationDataset:
    """The first `max_images` samples (all when None), keeping the class metadata."""
    if max_images is None or max_images >= len(dataset):
        return dataset
    if max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {max_images}")
    return subset(dataset, range(max_images))


def parse_measures(text: str) -> tuple[str, ...]:
    """``msp,entropy`` -> uncertainty measure names, checked; ``none`` or empty -> ()."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip() and p.strip() != "none"))
    unknown = [n for n in names if n not in SCORED_MEASURES]
    if unknown:
        raise UserError(f"unknown uncertainty measure(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(SCORED_MEASURES)} or none")
    return names


def with_mc_dropout(predictor: Any, samples: int, seed: int) -> Any:
    """`predictor` whose batches also carry the MC-dropout maps (`Predictions.maps`).

    The scored prediction stays the deterministic one, so every measure ranks the same errors; the
    `samples` extra passes per batch keep dropout on, with masks seeded by `seed`.
    """

    def predict(images: Any) -> Predictions:
        logits = predictor(images)
        return Predictions(logits, mc_dropout_maps(mc_dropout(predictor, images, samples=samples, seed=seed)))

    return predict


def default_accumulators(classes: ClassInfo, *, boundary_iou: bool = True, calibration: bool = True,
                         uncertainty: tuple[str, ...] = ("msp",)) -> list[Any]:
    """The metrics every evaluation reports: IoU family, optionally Boundary IoU, calibration, and how
    well each `uncertainty` measure flags misclassified pixels."""
    K, ignore = classes.num_classes, classes.ignore_index
    accumulators: list[Any] = [ConfusionMatrix(K, ignore_index=ignore), PerImageIoU(K, ignore_index=ignore)]
    if boundary_iou:
        accumulators.append(BoundaryIoU(K, ignore_index=ignore))
    if calibration:
        accumulators.append(CalibrationHistogram(K, ignore_index=ignore))
    if uncertainty:
        accumulators.append(UncertaintyHistogram(K, ignore_index=ignore, measures=uncertainty))
    return accumulators


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate on `config.device`; under torchrun every process takes a shard and rank 0 writes the run."""
    device = resolve_device(config.device)
    init_from_environment(device)
    checkpoint, dataset, _ = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    predictor = plain = predictor_from_checkpoint(checkpoint, config.inference, device=device)
    if any(name in MC_MEASURES for name in config.uncertainty):  # fail before writing anything
        require_dropout(predictor, dropout_fix(checkpoint.model["name"]))
        predictor = with_mc_dropout(predictor, config.mc_samples, config.seed)
    run_dir = RunDir(config.out) if is_main_process() else None
    if run_dir is not None:
        run_dir.write_config({"command": "eval", **vars(config)})
    accumulators = default_accumulators(checkpoint.classes, boundary_iou=config.boundary_iou,
                                        calibration=config.calibration, uncertainty=config.uncertainty)
    per_image = None
    if config.per_image:
        per_image = PerImageConfusion(checkpoint.classes.num_classes, len(dataset),
                                      ignore_index=checkpoint.classes.ignore_index)
        accumulators.append(per_image)
    metrics = evaluate(
        predictor,
        dataset,
        accumulators,
        batch_size=config.batch_size,
        batch_transform=None if per_image is None else per_image.index_batch,
        progress=config.progress,
        device=device,
    )
    metrics.update(refinement_cost(plain))
    metrics["num_images"] = len(dataset)
    metrics["class_names"] = list(checkpoint.classes.names)
    if run_dir is not None:
        run_dir.write_metrics(metrics)
        confusion = next(a for a in accumulators if isinstance(a, ConfusionMatrix))
        write_array(run_dir.file(CONFUSION_FILE), confusion.matrix)
        if per_image is not None:
            write_array(run_dir.file(PER_IMAGE_CONFUSION_FILE), per_image.matrices)
        if config.gallery:
            write_gallery(plain, dataset, run_dir.path, config.gallery, device)
        if config.report:
            write_run_report(run_dir.path)
    return EvalResult(metrics=metrics, classes=checkpoint.classes, run_dir=Path(config.out))
