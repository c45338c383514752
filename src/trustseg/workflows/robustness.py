"""`trustseg robustness`: a checkpoint on clean data and under every corruption x severity.

Each condition is one pass of the shared evaluation loop over a corrupted view of the dataset
(corrupted on the fly, never stored). Each finished condition is recorded in the run's journal at
once, so an interrupted run loses nothing and `resume` continues it with the conditions still to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trustseg.data.base import ClassInfo, SegmentationDataset
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_main_process
from trustseg.errors import UserError
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.image_quality import ImageQuality
from trustseg.refine.refiner import refinement_cost
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.robustness.corruptions import CORRUPTIONS, SEVERITIES, frost_source
from trustseg.robustness.dataset import corrupted_view
from trustseg.robustness.summary import CLEAN, condition_key, summarize
from trustseg.engine.journal import Journal, file_sha256
from trustseg.engine.rundir import RunDir
from trustseg.workflows.evaluation import checkpoint_and_data, default_accumulators

RESULTS = "robustness.json"


@dataclass(frozen=True)
class RobustnessConfig:
    checkpoint: str
    data: str
    out: str
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    split: str | None = None  # None: the spec's split, else "val"
    baseline: str | None = None  # robustness.json of a reference model, for mCE
    max_images: int | None = None
    batch_size: int = 1
    num_workers: int = 0
    seed: int = 0
    boundary_iou: bool = False
    calibration: bool = True  # ECE & co. and msp error detection per condition
    image_quality: bool = True  # PSNR, SSIM, noise, sharpness, contrast, colourfulness of the corrupted images
    inference: InferenceConfig = InferenceConfig()
    device: str = "auto"
    progress: bool = True
    resume: bool = False  # continue the interrupted run in `out` (same setup), skipping finished conditions
    report: bool = True  # write report.md / report.html at the end


@dataclass
class RobustnessResult:
    summary: dict[str, Any]
    conditions: dict[str, dict[str, Any]]
    classes: ClassInfo
    run_dir: Path


def read_results(path: Path, what: str, fix: str = "") -> dict[str, Any]:
    """A robustness.json: class names, and conditions each with an mIoU (a fraction, or null: NaN, which
    reads back as NaN) and per-class IoUs. Anything else, damaged or foreign, is a UserError naming `what`
    and the file, followed by `fix`."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path}: file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        results = None
    conditions = results.get("conditions") if isinstance(results, dict) else None
    names = results.get("class_names") if isinstance(results, dict) else None
    if not (isinstance(conditions, dict) and all(_is_condition(c) for c in conditions.values())
            and isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UserError(f"{what} {path}: not a robustness.json written by trustseg robustness (class_names, and "
                        f"conditions with mIoU and per_class each){fix}")
    for condition in conditions.values():
        nan_for_null(condition)
    return results


def nan_for_null(condition: dict[str, Any]) -> dict[str, Any]:
    """A condition read back from JSON, its mIoU a number again (JSON writes NaN, no class, as null)."""
    condition["mIoU"] = math.nan if condition["mIoU"] is None else float(condition["mIoU"])
    return condition


def _is_condition(value: Any) -> bool:
    if not (isinstance(value, dict) and "mIoU" in value and isinstance(value.get("per_class"), dict)):
        return False
    miou = value["mIoU"]
    return miou is None or (isinstance(miou, (int, float)) and not isinstance(miou, bool) and 0 <= miou <= 1)


def load_baseline(path: str, classes: ClassInfo, needed: list[str]) -> dict[str, dict[str, Any]]:
    """The conditions of a baseline run, checked to cover ours and to share our class set."""
    baseline = read_results(Path(path), "--baseline")
    conditions, names = baseline["conditions"], baseline["class_names"]
    if names != list(classes.names):
        raise UserError(f"--baseline {path}: its classes ({len(names)}: {', '.join(names[:4])}, ...) differ from the "
                        f"checkpoint's ({classes.num_classes}: {', '.join(classes.names[:4])}, ...)")
    missing = [key for key in needed if key not in conditions or math.isnan(conditions[key]["mIoU"])]
    if missing:
        raise UserError(f"--baseline {path}: lacks {len(missing)} of the conditions evaluated here "
                        f"(e.g. {', '.join(missing[:3])}); run the baseline with the same corruptions and severities")
    return conditions


def run_robustness(config: RobustnessConfig) -> RobustnessResult:
    device = resolve_device(config.device)
    init_from_environment(device)
    checkpoint, dataset, split = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    classes = checkpoint.classes
    keys = [CLEAN, *(condition_key(n, s) for n in config.corruptions for s in config.severities)]
    baseline = load_baseline(config.baseline, classes, keys) if config.baseline else None

    run_dir = RunDir(config.out)
    setup = {"checkpoint_sha256": file_sha256(config.checkpoint), "data": config.data, "split": split,
             "num_images": len(dataset), "seed": config.seed, "boundary_iou": config.boundary_iou,
             "calibration": config.calibration, "inference": config.inference, "frost_source": frost_source()}
    journal = Journal(run_dir, "robustness", setup, resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "robustness", **vars(config)})
    predictor = predictor_from_checkpoint(checkpoint, config.inference, device=device)

    todo = journal.announce(keys, "conditions")
    for number, key in enumerate(todo, 1):
        journal.record(key, evaluate_condition(predictor, dataset, key, classes, config,
                                               description=f"{key} ({number}/{len(todo)})", device=device))
    conditions = {key: nan_for_null(journal.done[key]) for key in keys}
    header = {"setup": {"checkpoint": config.checkpoint, **journal.setup}, "class_names": list(classes.names)}

    summary = summarize(conditions, config.corruptions, config.severities, baseline)
    if baseline is not None:
        summary["baseline"] = config.baseline
    if is_main_process():
        run_dir.write_json(RESULTS, {**header, "summary": summary, "conditions": conditions})
        run_dir.write_metrics({**{k: v for k, v in summary.items() if not isinstance(v, (dict, list))},
                               "per_class": conditions[CLEAN]["per_class"], "class_names": list(classes.names)})
        if config.report:
            write_run_report(run_dir.path)
    return RobustnessResult(summary=summary, conditions=conditions, classes=classes, run_dir=run_dir.path)


def evaluate_condition(predictor: Callable[[torch.Tensor], torch.Tensor], dataset: SegmentationDataset, key: str,
                       classes: ClassInfo, config: RobustnessConfig | Any, *, description: str,
                       device: torch.device) -> dict[str, Any]:
    """The metrics of `predictor` on `dataset` under the condition `key` (``clean`` or ``name/s``), through
    the one evaluation loop. `config` supplies seed, batch_size, num_workers, boundary_iou, calibration and
    progress (any object with those attributes, e.g. a RobustnessConfig), and optionally image_quality:
    then the result's ``quality`` holds the mean image-quality measures of the images the model saw. With
    a refining predictor the results carry the refinement's cost, ``refine_ms_per_image``."""
    measure = getattr(config, "image_quality", False)
    # corrupting in DataLoader workers only pays with workers; otherwise the batch keeps its clean images
    # until the transform corrupts them, which the full-reference measures compare against
    in_loader = device.type == "cpu" and (config.num_workers > 0 or not measure)
    data, transform = corrupted_view(dataset, key, seed=config.seed, device=device, in_loader=in_loader)
    quality = ImageQuality() if measure else None
    if quality is not None:
        transform = _measuring(quality, transform, None if data is dataset else dataset)
    accumulators = default_accumulators(classes, boundary_iou=config.boundary_iou, calibration=config.calibration,
                                        uncertainty=("msp",) if config.calibration else ())
    refiner = getattr(predictor, "refiner", None)
    if refiner is not None:
        refiner.reset()
    metrics = evaluate(predictor, data, accumulators, batch_size=config.batch_size, batch_transform=transform,
                       num_workers=config.num_workers, progress=config.progress, description=description,
                       device=device)
    if quality is not None:
        metrics["quality"] = quality.compute()
    return {**metrics, **refinement_cost(predictor)}


def _measuring(quality: ImageQuality, transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
               clean: SegmentationDataset | None) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A batch transform that applies `transform` and adds the images it yields to `quality`, against the
    batch's images before it or, when the loader already corrupted them, the `clean` dataset's images."""

    def apply(batch: dict[str, Any]) -> dict[str, Any]:
        if clean is None:
            references = batch["image"]
        else:
            references = torch.stack([clean[i]["image"] for i in batch["index"]]).to(batch["image"].device)
        batch = batch if transform is None else transform(batch)
        quality.update(batch["image"], references)
        return batch

    return apply


def corruption_rows(summary: dict[str, Any], conditions: dict[str, dict[str, Any]],
                    severities: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    """One row per corruption: mIoU per severity, mean, relative robustness (and CE / rCE with a baseline)."""
    per_corruption = summary["per_corruption"]
    extra = [k for k in ("CE", "rCE") if any(k in e for e in per_corruption.values())]
    header = ["corruption", *[f"s{s}" for s in severities], "mean", "rel. rob.", *extra]
    rows = []
    for name, entry in per_corruption.items():
        cells = [percent(conditions[condition_key(name, s)]["mIoU"]) for s in severities]
        rows.append([name, *cells, percent(entry["mIoU"]), percent(entry["relative_robustness"]),
                     *[percent(entry[k]) for k in extra]])
    return header, rows


def summary_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["clean mIoU", "mean corrupted mIoU", "relative robustness"]
    row = [percent(summary["clean_mIoU"]), percent(summary["mean_corrupted_mIoU"]), percent(summary["relative_robustness"])]
    for key, name in (("mCE", "mCE"), ("relative_mCE", "relative mCE")):
        if key in summary:
            header.append(name)
            row.append(percent(summary[key]))
    header.append("worst 3")
    row.append(", ".join(summary["worst"]))
    return header, [row]

