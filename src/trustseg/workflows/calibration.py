"""`trustseg calibrate`: fit post-hoc calibrators on held-out data, compare them on clean and corrupted
data, and write a calibrated checkpoint that eval/predict apply.

The base model runs once per batch and every calibrator reads its logits (one pass of the shared
evaluation loop per condition, all methods at once). Each method's row carries its measured
properties (translation invariance, argmax/order preservation) and how many pixel decisions it
changed, so a method that moves the segmentation map says so next to its calibration gain.

`--save best` never looks at the evaluation data: the last `holdout` share of the fit images is held
out, every method is fitted on the rest and scored on it by NLL, and the best argmax-preserving method
is written (`best-any`: the best of all). NLL, not ECE, because it is a proper scoring rule: ECE
rewards any map whose binned confidence matches the accuracy, even a constant one, and on a small
held-out set its binning error can exceed the gaps between methods. Fit and evaluation data that share
images are refused unless `allow_overlap` says it is meant.

Under shift (`fit_corruptions`, `calibration_shift`): the fit images, held-out ones included, are each
corrupted by a drawn condition (Tomani et al., CVPR 2021), evaluation corruptions must differ from the
fit ones (again unless `allow_overlap`), and each condition names its best decision-preserving method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustseg.calibrators.methods import METHODS, build_calibrator
from trustseg.calibrators.fit import fit_calibrator
from trustseg.calibrators.fit_data import collect_fit_data
from trustseg.calibrators.properties import PROPERTIES
from trustseg.engine.checkpoint import atomic_write, save_checkpoint
from trustseg.data.base import ClassInfo, SegmentationDataset, subset
from trustseg.data.identity import shared_sources
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_distributed, is_main_process
from trustseg.errors import UserError
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.refine.refiner import refinement_cost
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.robustness.dataset import corrupted_view
from trustseg.robustness.corruptions import SEVERITIES
from trustseg.robustness.summary import CLEAN, condition_key
from trustseg.engine.journal import Journal, file_sha256
from trustseg.engine.rundir import RunDir
from trustseg.workflows.calibration_shift import (
    best_decision_preserving, check_unseen, fit_conditions, fit_view, lofo_plan,
)
from trustseg.workflows.evaluation import checkpoint_and_data

RESULTS = "calibration.json"
UNCALIBRATED = "uncalibrated"
METRICS = ("ECE", "MCE", "aECE", "cwECE", "NLL", "Brier", "ECE_boundary", "ECE_img_mean", "mIoU")
# --save rules that choose a method on held-out fit images: which methods may be chosen
SELECTION_RULES = {"best": "argmax-preserving methods", "best-any": "all methods"}
SELECTION_SCORE = "NLL"


@dataclass(frozen=True)
class CalibrateConfig:
    checkpoint: str
    fit_data: str
    data: str
    out: str
    methods: tuple[str, ...] = tuple(METHODS)
    fit_split: str | None = None  # None: the spec's split, else "val"
    split: str | None = None  # None: the spec's split, else "val"
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (3,)
    # corruptions the fit images are drawn under (with clean), at fit_severities; () fits on clean data
    fit_corruptions: tuple[str, ...] = ()
    fit_severities: tuple[int, ...] = SEVERITIES
    # per family of `corruptions`: fit on the fit corruptions of the other families, evaluate on it; the
    # main calibrators are then fitted on clean data, for comparison
    leave_one_family_out: bool = False
    max_images: int | None = None
    max_pixels: int = 1_000_000  # uniform sample of labelled fit pixels for pixel-wise methods
    max_crops: int = 64  # random fit crops kept for spatial methods (LTS, IBTS)
    fit_crop: int = 512  # side of those crops (smaller images are kept whole)
    epochs: int = 20  # Adam passes over the crops for spatial methods
    lr: float = 1e-4  # their Adam learning rate (Ding et al., LTS, ICCV 2021)
    num_bins: int = 15
    # method whose calibrated checkpoint is written: a name, "none", "best" (lowest held-out NLL among
    # argmax-preserving methods) or "best-any" (among all methods)
    save: str = "best"
    holdout: float = 0.2  # share of the fit images held out to choose the method of best/best-any
    allow_overlap: bool = False  # accept fit and evaluation data that share images, or corruptions
    seed: int = 0
    inference: InferenceConfig = InferenceConfig()
    device: str = "auto"
    progress: bool = True
    resume: bool = False  # continue the interrupted run in `out` (same setup): fits, choice and conditions done are kept
    report: bool = True  # write report.md / report.html at the end


@dataclass
class CalibrateResult:
    methods: dict[str, dict[str, Any]]
    conditions: dict[str, dict[str, dict[str, Any]]]
    saved: Path | None
    classes: ClassInfo
    run_dir: Path
    selection: dict[str, Any] | None = None  # how --save best/best-any chose, on held-out fit images
    best: dict[str, dict[str, Any]] | None = None  # per condition, the lowest-ECE decision-preserving method
    leave_one_family_out: dict[str, dict[str, Any]] | None = None  # per held-out family: fits and conditions


def parse_methods(text: str) -> tuple[str, ...]:
    """``all`` or comma-separated method names -> method names, checked."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            names.extend(METHODS)
        elif part in METHODS:
            names.append(part)
        else:
            raise UserError(f"unknown calibration method {part!r}; expected all or some of {', '.join(METHODS)}")
    if not names:
        raise UserError("no calibration method given; expected all or some of " + ", ".join(METHODS))
    return tuple(dict.fromkeys(names))


class CalibratorBank(nn.Module):
    """images -> {"uncalibrated": logits, method: calibrated logits}, counting changed argmax pixels."""

    def __init__(self, predictor: nn.Module, calibrators: dict[str, nn.Module]) -> None:
        super().__init__()
        self.predictor, self.calibrators = predictor, nn.ModuleDict(calibrators)
        # buffers: they follow the bank to its device, where the process group sums them
        self.register_buffer("changed", torch.zeros(len(self.calibrators), dtype=torch.int64), persistent=False)
        self.register_buffer("pixels", torch.zeros((), dtype=torch.int64), persistent=False)

    def reset(self) -> None:
        self.changed.zero_()
        self.pixels.zero_()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.predictor(images)
        decisions = logits.max(1).indices
        outputs = {UNCALIBRATED: logits}
        for i, (name, calibrator) in enumerate(self.calibrators.items()):
            outputs[name] = calibrator(logits, images)
            self.changed[i] += (outputs[name].max(1).indices != decisions).sum()
        self.pixels += decisions.numel()
        return outputs

    def changed_fractions(self) -> dict[str, float]:
        """Share of pixels whose argmax each calibrator changed, summed over processes."""
        counts = torch.cat((self.changed, self.pixels[None]))
        if is_distributed():
            torch.distributed.all_reduce(counts)
        return {name: int(c) / max(int(counts[-1]), 1) for name, c in zip(self.calibrators, counts[:-1])}


def _check_save(config: CalibrateConfig) -> None:
    if config.save not in ("none", *SELECTION_RULES, *config.methods):
        raise UserError(f"--save {config.save!r}: expected {', '.join(SELECTION_RULES)}, none or one of the "
                        "fitted methods")
    if config.save == "best" and not any(METHODS[m][0].argmax_preserving for m in config.methods):
        raise UserError(f"--save best chooses among argmax-preserving methods, but --method "
                        f"{','.join(config.methods)} has none; add one (e.g. ts) or pass --save best-any")
    if config.save in SELECTION_RULES and not 0 < config.holdout < 1:
        raise UserError(f"--holdout {config.holdout}: expected a share of the fit images in (0, 1)")


def load_fit_data(config: CalibrateConfig, classes: ClassInfo, evaluated: SegmentationDataset) -> SegmentationDataset:
    """The --fit-data dataset, checked: the model's classes, and no image shared with `evaluated`."""
    fit_set = load_dataset(config.fit_data, split=resolve_split(config.fit_data, config.fit_split, "val"))
    if fit_set.classes.num_classes != classes.num_classes:
        raise UserError(f"--fit-data {config.fit_data!r} has {fit_set.classes.num_classes} classes but the "
                        f"checkpoint was trained with {classes.num_classes}")
    if not config.allow_overlap:
        shared = shared_sources(fit_set, evaluated)
        if shared:
            raise UserError(f"--fit-data {config.fit_data!r} and --data {config.data!r} share {len(shared)} "
                            f"image(s), e.g. {shared[0]}; fit and evaluate on disjoint images (e.g. #images=0:50 "
                            "and #images=50:) or pass --allow-overlap")
    return fit_set


def split_holdout(config: CalibrateConfig, fit_set: SegmentationDataset) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(images to fit on, images to choose the saved method on): the last `holdout` share of the fit
    images is held out when --save chooses (as Ding et al. validate LTS on the last 11 of 101 images),
    otherwise every fit image is fitted on."""
    if config.save not in SELECTION_RULES:
        return fit_set, None
    n = len(fit_set)
    if n < 2:
        raise UserError(f"--save {config.save} holds out part of --fit-data {config.fit_data!r} to choose the "
                        f"method, but it has {n} image; give more fit images or --save with a method name")
    held = min(n - 1, max(1, round(n * config.holdout)))
    return subset(fit_set, range(n - held)), subset(fit_set, range(n - held, n))


def _fit_all(config: CalibrateConfig, predictor: nn.Module, classes: ClassInfo, fit_set: SegmentationDataset,
             device: torch.device, journal: Journal, prefix: str = "",
             ) -> tuple[dict[str, nn.Module], dict[str, Any], dict[str, Any]]:
    """Every method fitted on one collection of fit data; a method fitted by an interrupted run is read
    back from its state file (the fit data is collected only when some method still needs it). `prefix`
    names the journal units and state files of one of several fits (leave one family out)."""
    calibrators = {}
    data = None
    for method in config.methods:
        calibrator = build_calibrator(method, classes.num_classes).to(device)
        unit, state_file = f"{prefix}fit/{method}", journal.run_dir.file(f"calibrators/{prefix}{method}.pt")
        if unit in journal.done:
            calibrator.load_state_dict(_read_state(state_file))
            calibrators[method] = calibrator
            continue
        if data is None:
            data = _collect(config, predictor, fit_set, device)
            journal.record(f"{prefix}fit_data", {"images": data.images, "labelled_pixels": data.labelled_pixels,
                                        "sample_pixels": int(data.labels.numel()), "crops": len(data.maps)})
        report = fit_calibrator(calibrator, data, ignore_index=classes.ignore_index, epochs=config.epochs,
                                lr=config.lr, progress=config.progress)
        if is_main_process():
            state = {k: v.detach().cpu() for k, v in calibrator.state_dict().items()}
            atomic_write(state_file, lambda handle: torch.save(state, handle))
        journal.record(unit, {
            "description": METHODS[method][2],
            "properties": {p: bool(getattr(calibrator, p)) for p in PROPERTIES},
            "fit": {"seconds": report.seconds, "nll_before": report.nll_before, "nll_after": report.nll_after,
                    "pixels": report.pixels, "images": report.images,
                    **({"crops": len(data.maps)} if calibrator.spatial else {}),
                    "on": "logit-map crops + images" if calibrator.spatial else "pixel sample"},
            "parameters": calibrator.summary(),
        })
        calibrators[method] = calibrator
    return (calibrators, {m: journal.done[f"{prefix}fit/{m}"] for m in config.methods},
            journal.done[f"{prefix}fit_data"])


def _collect(config: CalibrateConfig, predictor: nn.Module, fit_set: SegmentationDataset, device: torch.device):
    spatial = any(METHODS[m][0].spatial for m in config.methods)
    return collect_fit_data(predictor, fit_set, max_pixels=config.max_pixels,
                            max_crops=config.max_crops if spatial else 0, crop_size=config.fit_crop,
                            seed=config.seed, progress=config.progress, device=device)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for missing or corrupt files
        raise UserError(f"--resume: the fitted calibrator {path} is unreadable ({str(error)[:80]}); "
                        "use another --out") from None


def select_method(config: CalibrateConfig, predictor: nn.Module, calibrators: dict[str, nn.Module],
                  classes: ClassInfo, holdout: SegmentationDataset, device: torch.device) -> dict[str, Any]:
    """Score every fitted method on the held-out fit images (all labelled pixels, one pass of the
    evaluation loop) and choose the lowest NLL among the methods `config.save` allows."""
    bank = CalibratorBank(predictor, calibrators).to(device).eval()
    accumulators = {name: [CalibrationHistogram(classes.num_classes, ignore_index=classes.ignore_index,
                                                num_bins=config.num_bins, classwise=False, boundary_width=0)]
                    for name in (UNCALIBRATED, *calibrators)}
    results = evaluate(bank, holdout, accumulators, progress=config.progress, description="select", device=device)
    candidates = [m for m in calibrators if config.save == "best-any" or calibrators[m].argmax_preserving]
    scores = {name: {"NLL": r["NLL"], "ECE": r["ECE"]} for name, r in results.items()}
    chosen = min(candidates, key=lambda m: _sort_key(scores[m][SELECTION_SCORE]))
    return {"rule": config.save, "among": SELECTION_RULES[config.save], "score": SELECTION_SCORE,
            "holdout_images": len(holdout), "candidates": candidates, "scores": scores, "chosen": chosen}


def run_calibrate(config: CalibrateConfig) -> CalibrateResult:
    device = resolve_device(config.device)
    init_from_environment(device)
    _check_save(config)
    lofo = (lofo_plan(config.fit_corruptions, config.corruptions, config.severities)
            if config.leave_one_family_out else {})
    if not lofo:
        check_unseen(config.fit_corruptions, config.corruptions, config.allow_overlap)
    checkpoint, dataset, _ = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    checked = load_fit_data(config, checkpoint.classes, dataset)
    main_corruptions = () if lofo else config.fit_corruptions  # leave one family out compares with clean fits
    fit_set, holdout = split_holdout(config, fit_view(checked, main_corruptions, config.fit_severities, config.seed))
    run_dir = RunDir(config.out)
    runs = [CLEAN, *(condition_key(n, s) for n in config.corruptions for s in config.severities)]
    journal = Journal(run_dir, "calibrate", {
        "checkpoint_sha256": file_sha256(config.checkpoint), "fit_data": config.fit_data, "data": config.data,
        "fit_images": len(fit_set), "holdout_images": 0 if holdout is None else len(holdout),
        "num_images": len(dataset),
        **{k: getattr(config, k) for k in ("methods", "fit_corruptions", "fit_severities", "leave_one_family_out",
                                            "max_pixels", "max_crops", "fit_crop", "epochs", "lr", "num_bins",
                                            "save", "seed", "inference")}}, resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "calibrate", **vars(config)})
    units = [*(f"fit/{m}" for m in config.methods), *(["selection"] if holdout else []), *runs,
             *(f"lofo/{family}/{unit}" for family, plan in lofo.items()
               for unit in (*(f"fit/{m}" for m in config.methods), *plan["conditions"]))]
    journal.announce(units, "steps (fits, choice, conditions)")
    predictor = predictor_from_checkpoint(checkpoint, config.inference, calibrated=False, device=device)
    calibrators, methods, fit_summary = _fit_all(config, predictor, checkpoint.classes, fit_set, device, journal)
    if holdout is not None and "selection" not in journal.done:
        journal.record("selection", select_method(config, predictor, calibrators, checkpoint.classes, holdout, device))
    selection = journal.done.get("selection")
    bank = CalibratorBank(predictor, calibrators).to(device).eval()
    classes = checkpoint.classes
    for key in runs:
        if key not in journal.done:
            journal.record(key, _evaluate_condition(config, bank, dataset, key, classes, device))
    conditions = {key: journal.done[key] for key in runs}
    best = {key: best_decision_preserving(methods, results) for key, results in conditions.items()}
    held_out = {family: _leave_family_out(config, predictor, checked, dataset, classes, family, plan, device, journal)
                for family, plan in lofo.items()}
    saved = _save_calibrated(config, checkpoint, calibrators, selection, run_dir)
    if is_main_process():
        run_dir.write_json(RESULTS, {"setup": {"checkpoint": config.checkpoint, "fit_data": config.fit_data,
                                               "data": config.data, "num_images": len(dataset),
                                               "num_bins": config.num_bins, "seed": config.seed, **fit_summary,
                                               "fit_corruptions": list(main_corruptions),
                                               "fit_severities": list(config.fit_severities),
                                               "fit_conditions": fit_conditions(fit_set),
                                               **refinement_cost(predictor)},
                                     "methods": methods, "selection": selection, "conditions": conditions,
                                     "best_decision_preserving": best, "leave_one_family_out": held_out or None,
                                     "saved": None if saved is None else saved.name})
        if config.report:
            write_run_report(run_dir.path)
    return CalibrateResult(methods, conditions, saved, classes, run_dir.path, selection, best, held_out or None)


def _leave_family_out(config: CalibrateConfig, predictor: nn.Module, checked: SegmentationDataset,
                      dataset: SegmentationDataset, classes: ClassInfo, family: str, plan: dict[str, list[str]],
                      device: torch.device,
                      journal: Journal) -> dict[str, Any]:
    """Fit every method on the fit images drawn under the other families' corruptions (the same images
    as the main fit), evaluate them on this family's conditions."""
    prefix = f"lofo/{family}/"
    fit_set, _ = split_holdout(config, fit_view(checked, tuple(plan["fit_corruptions"]), config.fit_severities,
                                                config.seed))
    calibrators, methods, fit_summary = _fit_all(config, predictor, classes, fit_set, device, journal, prefix)
    bank = CalibratorBank(predictor, calibrators).to(device).eval()
    for key in plan["conditions"]:
        if prefix + key not in journal.done:
            journal.record(prefix + key, _evaluate_condition(config, bank, dataset, key, classes, device))
    conditions = {key: journal.done[prefix + key] for key in plan["conditions"]}
    return {"fit_corruptions": plan["fit_corruptions"], "fit_conditions": fit_conditions(fit_set),
            "fit_data": fit_summary, "methods": methods, "conditions": conditions,
            "best_decision_preserving": {key: best_decision_preserving(methods, results)
                                         for key, results in conditions.items()}}


def _evaluate_condition(config: CalibrateConfig, bank: CalibratorBank, dataset: SegmentationDataset, key: str,
                        classes: ClassInfo, device: torch.device) -> dict[str, dict[str, Any]]:
    """Every method (and the uncalibrated model) on one condition: one pass of the evaluation loop."""
    data, transform = corrupted_view(dataset, key, seed=config.seed, device=device)
    bank.reset()
    accumulators = {
        name: [ConfusionMatrix(classes.num_classes, ignore_index=classes.ignore_index),
               CalibrationHistogram(classes.num_classes, ignore_index=classes.ignore_index, num_bins=config.num_bins)]
        for name in (UNCALIBRATED, *bank.calibrators)
    }
    results = evaluate(bank, data, accumulators, batch_transform=transform, progress=config.progress,
                       description=key, device=device)
    changed = bank.changed_fractions()
    base_miou = results[UNCALIBRATED]["mIoU"]
    return {
        name: {**{m: r[m] for m in METRICS}, "delta_mIoU": r["mIoU"] - base_miou,
               "decisions_changed": changed.get(name, 0.0), "reliability": _reliability(r)}
        for name, r in results.items()
    }


def _reliability(results: dict[str, Any]) -> dict[str, list[float]]:
    """Bin edges with per-bin count, confidence and accuracy over all labelled pixels."""
    table = results["reliability"]
    return {"lower": table["lower"], "upper": table["upper"], **table["all"]}


def _save_calibrated(config, checkpoint, calibrators, selection, run_dir: RunDir) -> Path | None:
    """Write the checkpoint with the chosen calibrator inside (`--save`), on the main process."""
    if config.save == "none":
        return None
    method = config.save if selection is None else selection["chosen"]
    path = run_dir.file(f"calibrated_{method}.pt")
    if is_main_process():
        state = {k: v.detach().cpu().clone() for k, v in calibrators[method].state_dict().items()}
        save_checkpoint(replace(checkpoint, calibrator={"method": method, "state_dict": state},
                                training_state={}), path)
    return path


def _sort_key(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value


COMPACT = ("ECE", "aECE", "NLL", "ECE_boundary", "mIoU")


def method_rows(methods: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]],
                metrics: tuple[str, ...] = METRICS, properties: bool = True) -> tuple[list[str], list[list[str]]]:
    """One row per method (the uncalibrated model first): calibration metrics, mIoU and its change,
    decisions changed, and (`properties`) the measured properties."""
    header = ["method", *metrics, "Δ mIoU", "changed px"]
    header += ["TI", "argmax kept", "order kept"] if properties else []
    mark = {True: "yes", False: "no"}
    rows = []
    for name, r in results.items():
        held = methods[name]["properties"] if name in methods else dict.fromkeys(PROPERTIES, True)
        delta = r["delta_mIoU"]
        rows.append([name, *(f"{r[m]:.4f}" if m in ("NLL", "Brier") else percent(r[m]) for m in metrics),
                     f"{100 * delta:+.2f}" if delta else "0", f"{100 * r['decisions_changed']:.2f}%",
                     *(mark[held[p]] for p in PROPERTIES if properties)])
    return header, rows

