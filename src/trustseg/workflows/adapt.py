"""`trustseg adapt`: a checkpoint evaluated as it is (source), while adapting at test time with each of
one or more methods, and optionally with training-free refinement, on clean data and under each
corruption x severity, through the shared evaluation loop (mIoU, Boundary IoU, ECE, per condition).

Each condition is one unit of the run's journal per pass (source, each method, refined), so an
interrupted run resumes with what is left, and the methods are compared on the same corrupted images.
Every adapted pass starts from the source weights: online mode carries the adapted state from image to
image within one condition, never into the next one, so a condition's numbers do not depend on which
conditions ran before it. All passes use the model's raw logits (no calibrator of the checkpoint):
adaptation changes the logits a calibrator was fitted to. Under torchrun each process adapts on its own
shard of the images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from trustseg.adapt.predictor import AdaptConfig, AdaptingPredictor
from trustseg.data.base import ClassInfo
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_main_process
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.engine.journal import Journal, file_sha256
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError
from trustseg.refine.refiner import RefineConfig
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.robustness.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, check_corruption, frost_source
from trustseg.robustness.summary import CLEAN, condition_key, summarize
from trustseg.workflows.evaluation import checkpoint_and_data
from trustseg.workflows.robustness import evaluate_condition, nan_for_null

RESULTS = "adapt.json"
SOURCE, REFINED = "source", "refined"


@dataclass(frozen=True)
class AdaptRunConfig:
    checkpoint: str
    data: str
    out: str
    adaptations: tuple[AdaptConfig, ...] = (AdaptConfig(),)  # one adapted pass each, named by its method
    refine: RefineConfig | None = None  # adds the pass "refined": the source model with refinement
    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = SEVERITIES
    split: str | None = None  # None: the spec's split, else "val"
    max_images: int | None = None
    batch_size: int = 1  # also the adaptation batch: episodic mode resets per batch
    num_workers: int = 0
    seed: int = 0  # of the per-image corruption randomness
    inference: InferenceConfig = InferenceConfig()
    device: str = "auto"
    boundary_iou: bool = True
    progress: bool = True
    resume: bool = False
    report: bool = True  # write report.md / report.html at the end
    calibration: ClassVar[bool] = True  # ECE in every pass (read by evaluate_condition)

    def __post_init__(self) -> None:
        methods = [a.method for a in self.adaptations]
        if not methods or len(set(methods)) != len(methods):
            raise UserError(f"--method {','.join(methods)}: expected one or more distinct methods")
        for name in self.corruptions:
            for severity in self.severities:
                check_corruption(name, severity)


@dataclass
class AdaptResult:
    summary: dict[str, Any]
    conditions: dict[str, dict[str, Any]]  # condition -> {pass: metrics (+ "adaptation" for a method's pass)}
    classes: ClassInfo
    run_dir: Path


def unit_name(which: str, condition: str) -> str:
    return f"{which}@{condition}"


def pass_names(config: AdaptRunConfig) -> tuple[str, ...]:
    """"source", then each method's adapted pass, then "refined" with refinement."""
    return (SOURCE, *(a.method for a in config.adaptations), *((REFINED,) if config.refine else ()))


def run_adapt(config: AdaptRunConfig) -> AdaptResult:
    device = resolve_device(config.device)
    init_from_environment(device)
    checkpoint, dataset, split = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    classes = checkpoint.classes
    source = predictor_from_checkpoint(checkpoint, config.inference, calibrated=False, device=device)
    refined = None if config.refine is None else predictor_from_checkpoint(
        checkpoint, replace(config.inference, refine=config.refine), calibrated=False, device=device)
    adaptations = {a.method: a for a in config.adaptations}

    def predictor_for(which: str) -> Any:  # a fresh adapting one per condition: each starts from the source weights
        if which in adaptations:
            return AdaptingPredictor(source, classes.num_classes, adaptations[which],
                                     what=f"the model of {config.checkpoint}")
        return refined if which == REFINED else source

    # a model that cannot be adapted fails before the run directory is touched (the same check for every method)
    predictor_for(config.adaptations[0].method)
    passes = pass_names(config)
    keys = [CLEAN, *(condition_key(n, s) for n in config.corruptions for s in config.severities)]
    run_dir = RunDir(config.out)
    setup = {"checkpoint_sha256": file_sha256(config.checkpoint), "data": config.data, "split": split,
             "num_images": len(dataset), "seed": config.seed, "batch_size": config.batch_size,
             "adaptations": list(config.adaptations), "refine": config.refine, "inference": config.inference,
             "frost_source": frost_source()}
    journal = Journal(run_dir, "adapt", setup, resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "adapt", **vars(config)})

    units = [unit_name(which, key) for key in keys for which in passes]
    todo = journal.announce(units, "passes")
    for number, unit in enumerate(todo, 1):
        which, key = unit.split("@", 1)
        predictor = predictor_for(which)
        metrics = evaluate_condition(predictor, dataset, key, classes, config,
                                     description=f"{unit} ({number}/{len(todo)})", device=device)
        if isinstance(predictor, AdaptingPredictor):
            metrics["adaptation"] = predictor.summary()
        journal.record(unit, metrics)
    conditions = {key: {which: nan_for_null(journal.done[unit_name(which, key)]) for which in passes}
                  for key in keys}

    summary = summarize_passes(conditions, passes, config.corruptions, config.severities)
    if is_main_process():
        header = {"setup": {"checkpoint": config.checkpoint, **journal.setup}, "passes": list(passes),
                  "class_names": list(classes.names)}
        run_dir.write_json(RESULTS, {**header, "summary": summary, "conditions": conditions})
        run_dir.write_metrics({**{f"{which}_{k}": v for which in passes for k, v in summary[which].items()
                                  if not isinstance(v, dict)},
                               **{f"mIoU_gain_{which}": gain for which, gain in summary["mIoU_gain"].items()},
                               "resets": sum(summary["resets"].values()),
                               "per_class": conditions[CLEAN][passes[1]]["per_class"],
                               "class_names": list(classes.names)})
        if config.report:
            write_run_report(run_dir.path)
    return AdaptResult(summary=summary, conditions=conditions, classes=classes, run_dir=run_dir.path)


def _mean(values: list[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def summarize_passes(conditions: dict[str, dict[str, Any]], passes: tuple[str, ...], corruptions: tuple[str, ...],
                     severities: tuple[int, ...]) -> dict[str, Any]:
    """Per pass: clean and mean corrupted mIoU and mIoU per corruption family (the robustness summary),
    mean Boundary IoU and ECE over all conditions, ECE per family; per pass other than the source, its
    mean mIoU over all conditions minus the source's; per method, the number of safety resets."""
    summary: dict[str, Any] = {}
    for which in passes:
        per_pass = {key: results[which] for key, results in conditions.items()}
        robustness = summarize(per_pass, corruptions, severities)
        summary[which] = {"clean_mIoU": robustness["clean_mIoU"], "mean_corrupted_mIoU": robustness["mean_corrupted_mIoU"],
                          "mean_mIoU": _mean([m["mIoU"] for m in per_pass.values()]),
                          "mean_boundary_IoU": _mean([m.get("mBIoU") for m in per_pass.values()]),
                          "mean_ECE": _mean([m.get("ECE") for m in per_pass.values()]),
                          "per_family_mIoU": robustness["per_family_mIoU"],
                          "per_family_ECE": family_means(per_pass, "ECE", corruptions, severities)}
    summary["mIoU_gain"] = {which: summary[which]["mean_mIoU"] - summary[SOURCE]["mean_mIoU"]
                            for which in passes if which != SOURCE}
    summary["resets"] = {which: sum(results[which]["adaptation"]["resets"] for results in conditions.values())
                         for which in passes if "adaptation" in conditions[CLEAN][which]}
    return summary


def family_means(per_condition: dict[str, dict[str, Any]], metric: str, corruptions: tuple[str, ...],
                 severities: tuple[int, ...]) -> dict[str, float]:
    """Mean of `metric` per corruption family over its corruptions x severities."""
    return {family: _mean([per_condition[condition_key(n, s)].get(metric) for n in names if n in corruptions
                           for s in severities])
            for family, names in FAMILIES.items() if any(n in corruptions for n in names)}


def condition_rows(conditions: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per condition: mIoU and ECE of every pass, and the safety resets of the adapted ones."""
    passes = list(next(iter(conditions.values())))
    header = ["condition", *(f"{p} mIoU" for p in passes), *(f"{p} ECE" for p in passes), "resets"]
    rows = []
    for key, results in conditions.items():
        resets = sum(m["adaptation"]["resets"] for m in results.values() if "adaptation" in m)
        rows.append([key, *(percent(results[p]["mIoU"]) for p in passes),
                     *(percent(results[p].get("ECE")) for p in passes), str(resets)])
    return header, rows
