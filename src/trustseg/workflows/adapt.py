"""`trustseg adapt`: a checkpoint evaluated as it is (source) and while adapting at test time, on clean
data and under each corruption x severity, through the shared evaluation loop (mIoU, ECE, per condition).

Each condition is two units of the run's journal, the source pass and the adapted pass, so an
interrupted run resumes with what is left. Every adapted pass starts from the source weights: online
mode carries the adapted state from image to image within one condition, never into the next one, so
a condition's numbers do not depend on which conditions ran before it. Both passes use the model's raw
logits (no calibrator of the checkpoint): adaptation changes the logits a calibrator was fitted to.
Under torchrun each process adapts on its own shard of the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustseg.adapt.predictor import AdaptConfig, AdaptingPredictor
from trustseg.data.base import ClassInfo
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_main_process
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.engine.journal import Journal, file_sha256
from trustseg.engine.rundir import RunDir
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.robustness.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, frost_source
from trustseg.robustness.dataset import corrupted_view
from trustseg.robustness.summary import CLEAN, condition_key, summarize
from trustseg.workflows.evaluation import checkpoint_and_data, default_accumulators
from trustseg.workflows.robustness import nan_for_null

RESULTS = "adapt.json"
PASSES = ("source", "adapted")


@dataclass(frozen=True)
class AdaptRunConfig:
    checkpoint: str
    data: str
    out: str
    adaptation: AdaptConfig = AdaptConfig()
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    split: str | None = None  # None: the spec's split, else "val"
    max_images: int | None = None
    batch_size: int = 1  # also the adaptation batch: episodic mode resets per batch
    num_workers: int = 0
    seed: int = 0  # of the per-image corruption randomness
    inference: InferenceConfig = InferenceConfig()
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    report: bool = True  # write report.md / report.html at the end

    def __post_init__(self) -> None:
        for name in self.corruptions:
            for severity in self.severities:
                check_corruption(name, severity)


@dataclass
class AdaptResult:
    summary: dict[str, Any]
    conditions: dict[str, dict[str, Any]]  # condition -> {"source": metrics, "adapted": metrics + "adaptation"}
    classes: ClassInfo
    run_dir: Path


def unit_name(which: str, condition: str) -> str:
    return f"{which}@{condition}"


def run_adapt(config: AdaptRunConfig) -> AdaptResult:
    device = resolve_device(config.device)
    init_from_environment(device)
    checkpoint, dataset, split = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    classes = checkpoint.classes
    source = predictor_from_checkpoint(checkpoint, config.inference, calibrated=False, device=device)

    def adapting() -> AdaptingPredictor:  # a fresh one per condition: each starts from the source weights
        return AdaptingPredictor(source, classes.num_classes, config.adaptation, what=f"the model of {config.checkpoint}")

    adapting()  # a model that cannot be adapted fails before the run directory is touched
    keys = [CLEAN, *(condition_key(n, s) for n in config.corruptions for s in config.severities)]
    run_dir = RunDir(config.out)
    setup = {"checkpoint_sha256": file_sha256(config.checkpoint), "data": config.data, "split": split,
             "num_images": len(dataset), "seed": config.seed, "batch_size": config.batch_size,
             "adaptation": config.adaptation, "inference": config.inference, "frost_source": frost_source()}
    journal = Journal(run_dir, "adapt", setup, resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "adapt", **vars(config)})

    units = [unit_name(which, key) for key in keys for which in PASSES]
    todo = journal.announce(units, "passes")
    for number, unit in enumerate(todo, 1):
        which, key = unit.split("@", 1)
        data, transform = corrupted_view(dataset, key, seed=config.seed, device=device)
        predictor = source if which == "source" else adapting()
        metrics = evaluate(predictor, data, default_accumulators(classes, boundary_iou=False, calibration=True),
                           batch_size=config.batch_size, batch_transform=transform, num_workers=config.num_workers,
                           progress=config.progress, description=f"{unit} ({number}/{len(todo)})", device=device)
        if isinstance(predictor, AdaptingPredictor):
            metrics["adaptation"] = predictor.summary()
        journal.record(unit, metrics)
    conditions = {key: {which: nan_for_null(journal.done[unit_name(which, key)]) for which in PASSES} for key in keys}

    summary = summarize_passes(conditions, config.corruptions, config.severities)
    if is_main_process():
        header = {"setup": {"checkpoint": config.checkpoint, **journal.setup}, "class_names": list(classes.names)}
        run_dir.write_json(RESULTS, {**header, "summary": summary, "conditions": conditions})
        run_dir.write_metrics({**{f"{which}_{k}": v for which in PASSES for k, v in summary[which].items()},
                               "mIoU_gain": summary["mIoU_gain"], "resets": summary["resets"],
                               "per_class": conditions[CLEAN]["adapted"]["per_class"], "class_names": list(classes.names)})
        if config.report:
            write_run_report(run_dir.path)
    return AdaptResult(summary=summary, conditions=conditions, classes=classes, run_dir=run_dir.path)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize_passes(conditions: dict[str, dict[str, Any]], corruptions: tuple[str, ...],
                     severities: tuple[int, ...]) -> dict[str, Any]:
    """Per pass: clean and mean corrupted mIoU (the robustness summary), mean ECE over all conditions;
    the adapted minus source mean mIoU over all conditions; the number of safety resets."""
    summary: dict[str, Any] = {}
    for which in PASSES:
        per_pass = {key: passes[which] for key, passes in conditions.items()}
        robustness = summarize(per_pass, corruptions, severities)
        summary[which] = {"clean_mIoU": robustness["clean_mIoU"], "mean_corrupted_mIoU": robustness["mean_corrupted_mIoU"],
                          "mean_mIoU": _mean([m["mIoU"] for m in per_pass.values()]),
                          "mean_ECE": _mean([m.get("ECE", math.nan) for m in per_pass.values()])}
    summary["mIoU_gain"] = summary["adapted"]["mean_mIoU"] - summary["source"]["mean_mIoU"]
    summary["resets"] = sum(passes["adapted"]["adaptation"]["resets"] for passes in conditions.values())
    return summary


def condition_rows(conditions: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per condition: mIoU and ECE before and after adaptation, and the safety resets."""
    header = ["condition", "source mIoU", "adapted mIoU", "gain", "source ECE", "adapted ECE", "resets"]
    rows = []
    for key, passes in conditions.items():
        source, adapted = passes["source"], passes["adapted"]
        rows.append([key, percent(source["mIoU"]), percent(adapted["mIoU"]), percent(adapted["mIoU"] - source["mIoU"]),
                     percent(source.get("ECE")), percent(adapted.get("ECE")), str(adapted["adaptation"]["resets"])])
    return header, rows
