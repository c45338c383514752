"""`trustseg calibrate`: fit post-hoc calibrators on held-out data, compare them on clean and corrupted
data, and write a calibrated checkpoint that eval/predict apply.

The base model runs once per batch and every calibrator reads its logits (one pass of the shared
evaluation loop per condition, all methods at once). Each method's row carries its measured
properties (translation invariance, argmax/order preservation) and how many pixel decisions it
changed, so a method that moves the segmentation map says so next to its calibration gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustseg.calibrators.methods import METHODS, build_calibrator
from trustseg.calibrators.fit import collect_fit_data, fit_calibrator
from trustseg.calibrators.properties import PROPERTIES
from trustseg.engine.checkpoint import load_checkpoint, save_checkpoint
from trustseg.data.base import ClassInfo
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.engine.distributed import init_from_environment, is_distributed, is_main_process
from trustseg.errors import UserError
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.report.document import Document
from trustseg.report.plots import reliability_diagrams
from trustseg.report.tables import percent
from trustseg.robustness.dataset import CorruptedDataset
from trustseg.robustness.summary import CLEAN, condition_key
from trustseg.engine.rundir import RunDir
from trustseg.workflows.evaluation import check_same_classes, first_images

RESULTS = "calibration.json"
UNCALIBRATED = "uncalibrated"
METRICS = ("ECE", "MCE", "aECE", "cwECE", "NLL", "Brier", "ECE_boundary", "ECE_img_mean", "mIoU")


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
    max_images: int | None = None
    max_pixels: int = 1_000_000  # fit subsample for pixel-wise methods
    max_maps: int = 64  # fit images kept whole for spatial methods (LTS, IBTS)
    epochs: int = 20  # Adam passes over the maps for spatial methods
    num_bins: int = 15
    save: str = "best"  # method whose calibrated checkpoint is written: a name, "best" (lowest clean ECE) or "none"
    seed: int = 0
    inference: InferenceConfig = InferenceConfig()
    progress: bool = True


@dataclass
class CalibrateResult:
    methods: dict[str, dict[str, Any]]
    conditions: dict[str, dict[str, dict[str, Any]]]
    saved: Path | None
    classes: ClassInfo
    run_dir: Path


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
        self.reset()

    def reset(self) -> None:
        self.changed = torch.zeros(len(self.calibrators), dtype=torch.int64)
        self.pixels = torch.zeros((), dtype=torch.int64)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.predictor(images)
        decisions = logits.max(1).indices
        outputs = {UNCALIBRATED: logits}
        for i, (name, calibrator) in enumerate(self.calibrators.items()):
            outputs[name] = calibrator(logits, images)
            self.changed[i] += int((outputs[name].max(1).indices != decisions).sum())
        self.pixels += decisions.numel()
        return outputs

    def changed_fractions(self) -> dict[str, float]:
        """Share of pixels whose argmax each calibrator changed, summed over processes."""
        counts = torch.cat((self.changed, self.pixels[None]))
        if is_distributed():
            torch.distributed.all_reduce(counts)
        return {name: int(c) / max(int(counts[-1]), 1) for name, c in zip(self.calibrators, counts[:-1])}


def _fit_all(config: CalibrateConfig, predictor: nn.Module, classes: ClassInfo):
    fit_set = load_dataset(config.fit_data, split=resolve_split(config.fit_data, config.fit_split, "val"))
    if fit_set.classes.num_classes != classes.num_classes:
        raise UserError(f"--fit-data {config.fit_data!r} has {fit_set.classes.num_classes} classes but the "
                        f"checkpoint was trained with {classes.num_classes}")
    spatial = any(METHODS[m][0].spatial for m in config.methods)
    data = collect_fit_data(predictor, fit_set, max_pixels=config.max_pixels,
                            max_maps=config.max_maps if spatial else 0, seed=config.seed, progress=config.progress)
    calibrators, reports = {}, {}
    for method in config.methods:
        calibrator = build_calibrator(method, classes.num_classes)
        report = fit_calibrator(calibrator, data, ignore_index=classes.ignore_index, epochs=config.epochs,
                                progress=config.progress)
        calibrators[method] = calibrator
        reports[method] = {
            "description": METHODS[method][2],
            "properties": {p: bool(getattr(calibrator, p)) for p in PROPERTIES},
            "fit": {"seconds": report.seconds, "nll_before": report.nll_before, "nll_after": report.nll_after,
                    "pixels": report.pixels, "images": report.images if not calibrator.spatial else len(data.maps),
                    "on": "logit maps + images" if calibrator.spatial else "pixel subsample"},
            "parameters": calibrator.summary(),
        }
    return calibrators, reports, {"images": data.images, "labelled_pixels": data.labelled_pixels,
                                  "subsample_pixels": int(data.labels.numel()), "maps": len(data.maps)}


def run_calibrate(config: CalibrateConfig) -> CalibrateResult:
    init_from_environment()
    if config.save not in ("best", "none", *config.methods):
        raise UserError(f"--save {config.save!r}: expected best, none or one of the fitted methods")
    checkpoint = load_checkpoint(config.checkpoint)
    dataset = first_images(load_dataset(config.data, split=resolve_split(config.data, config.split, "val")),
                           config.max_images)
    check_same_classes(checkpoint, dataset, config.data)
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "calibrate", **vars(config)})
    runs = [(CLEAN, dataset), *((condition_key(n, s), CorruptedDataset(dataset, n, s, seed=config.seed))
                                for n in config.corruptions for s in config.severities)]
    predictor = predictor_from_checkpoint(checkpoint, config.inference, calibrated=False)
    calibrators, methods, fit_summary = _fit_all(config, predictor, checkpoint.classes)
    bank = CalibratorBank(predictor, calibrators).eval()
    classes = checkpoint.classes
    conditions: dict[str, dict[str, dict[str, Any]]] = {}
    for key, data in runs:
        bank.reset()
        accumulators = {
            name: [ConfusionMatrix(classes.num_classes, ignore_index=classes.ignore_index),
                   CalibrationHistogram(classes.num_classes, ignore_index=classes.ignore_index,
                                        num_bins=config.num_bins)]
            for name in (UNCALIBRATED, *calibrators)
        }
        results = evaluate(bank, data, accumulators, progress=config.progress, description=key)
        changed = bank.changed_fractions()
        base_miou = results[UNCALIBRATED]["mIoU"]
        conditions[key] = {
            name: {**{m: r[m] for m in METRICS}, "delta_mIoU": r["mIoU"] - base_miou,
                   "decisions_changed": changed.get(name, 0.0), "reliability": _reliability(r)}
            for name, r in results.items()
        }
    saved = _save_calibrated(config, checkpoint, calibrators, conditions[CLEAN], run_dir)
    if is_main_process():
        run_dir.write_json(RESULTS, {"setup": {"checkpoint": config.checkpoint, "fit_data": config.fit_data,
                                               "data": config.data, "num_images": len(dataset),
                                               "num_bins": config.num_bins, "seed": config.seed, **fit_summary},
                                     "methods": methods, "conditions": conditions,
                                     "saved": None if saved is None else saved.name})
        write_report(run_dir, config, methods, conditions, saved)
    return CalibrateResult(methods, conditions, saved, classes, run_dir.path)


def _reliability(results: dict[str, Any]) -> dict[str, list[float]]:
    """Bin edges with per-bin count, confidence and accuracy over all labelled pixels."""
    table = results["reliability"]
    return {"lower": table["lower"], "upper": table["upper"], **table["all"]}


def _save_calibrated(config, checkpoint, calibrators, clean, run_dir: RunDir) -> Path | None:
    """Write the checkpoint with the chosen calibrator inside (`--save`), on the main process."""
    if config.save == "none":
        return None
    method = min(calibrators, key=lambda m: _sort_key(clean[m]["ECE"])) if config.save == "best" else config.save
    path = run_dir.file(f"calibrated_{method}.pt")
    if is_main_process():
        state = {k: v.detach().clone() for k, v in calibrators[method].state_dict().items()}
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


def write_report(run_dir: RunDir, config: CalibrateConfig, methods, conditions, saved: Path | None) -> Document:
    """Tables per condition, reliability diagrams on clean data, report.md/html."""
    clean = conditions[CLEAN]
    diagrams = reliability_diagrams({name: r["reliability"] for name, r in clean.items()},
                                    run_dir.file("reliability.png"), title="Reliability on clean data")
    document = Document(f"Calibration of {config.checkpoint}")
    document.paragraph(f"Fitted on {config.fit_data}; evaluated on {config.data}. ECE family: top-label, "
                       f"{config.num_bins} equal-width bins, all labelled pixels (ECE_boundary: within 5 px of "
                       "a class edge; ECE_img_mean: per-image mean). Percentages except NLL and Brier. "
                       "Δ mIoU is against the uncalibrated model; decisions changed is the share of pixels "
                       "whose predicted class the calibrator changed (changed px).")
    for key, results in conditions.items():
        document.heading("Clean data" if key == CLEAN else f"Under {key}").table(*method_rows(methods, results))
    fits = [[m, f"{r['fit']['seconds']:.1f} s", r["fit"]["on"], f"{r['fit']['nll_before']:.4f}",
             f"{r['fit']['nll_after']:.4f}", ", ".join(f"{k} {v:.3g}" for k, v in r["parameters"].items())]
            for m, r in methods.items()]
    document.heading("Fits").table(["method", "time", "fitted on", "NLL before", "NLL after", "parameters"], fits)
    if saved is not None:
        document.paragraph(f"Calibrated checkpoint: {saved.name} (trustseg eval/predict apply its calibrator).")
    document.image(diagrams, "reliability diagrams, clean data")
    document.write(run_dir.path)
    return document
