"""`trustseg experiment pos-embedding`: does a ViT need a positional embedding? The claim of Active
Spatial Guidance (Liu et al. 2026) put to the test on the user's data.

One training recipe is trained once per variant (learned absolute embedding `ape`, `rope`, no
positional mechanism `none`, and `none` + ASG `asg`) and seed, under the same budget (minutes or
steps). Each final model (last.pt: choosing the best validation step would select on the data we
report) is evaluated through the one evaluation loop at its training resolution and at other scales
(resolution transfer), and a linear probe measures how well its frozen final tokens know their
position. Every finished (variant, seed) is recorded in the run's journal, so an interrupted
experiment resumes (an interrupted training continues from its last.pt).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from trustseg.data.base import SegmentationDataset
from trustseg.data.spec import load_dataset
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import is_main_process
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import InferenceConfig, pad_to_multiple, predictor_from_checkpoint
from trustseg.engine.journal import Journal
from trustseg.engine.rundir import RunDir, to_plain
from trustseg.errors import UserError
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.models.positions import probe_positions
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.training.config import TrainConfig, config_from_dict, load_train_config
from trustseg.training.data import val_spec
from trustseg.training.loop import LAST, train

RECIPE = files("trustseg") / "recipes" / "pos_embedding.yaml"
RESULTS = "pos_embedding.json"
VARIANTS = {  # name -> recipe overrides
    "ape": ["model.options.pos=ape", "asg.enabled=false"],
    "rope": ["model.options.pos=rope", "asg.enabled=false"],
    "none": ["model.options.pos=none", "asg.enabled=false"],
    "asg": ["model.options.pos=none", "asg.enabled=true"],
}
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class PosEmbeddingConfig:
    data: str
    out: str
    budget_min: float | None = None  # training budget per run in minutes, or:
    steps: int | None = None  # in optimiser steps (the recipe's steps when both are None)
    seeds: int = 2
    variants: tuple[str, ...] = tuple(VARIANTS)
    scales: tuple[float, ...] = SCALES  # test resolutions, as factors of the training resolution
    recipe: str | None = None  # a training recipe for a vit_segmenter; None: the built-in one
    overrides: tuple[str, ...] = ()  # key=value changes to the recipe
    probe_images: int = 16  # val images whose tokens the position probe reads (half fit, half test)
    device: str = "auto"
    progress: bool = True
    resume: bool = False


@dataclass
class PosEmbeddingResult:
    runs: dict[str, dict[str, Any]]  # "variant/seed" -> what it trained and measured
    summary: dict[str, dict[str, Any]]  # variant -> mean and std over seeds
    run_dir: Path


def base_recipe(config: PosEmbeddingConfig) -> TrainConfig:
    """The shared recipe with the experiment's data, budget and device; checked to be a ViT segmenter."""
    budget = []  # the recipe's own when neither is given
    if config.budget_min:
        budget = ["steps=null", "epochs=null", f"time_budget_min={config.budget_min}"]
    elif config.steps:
        budget = [f"steps={config.steps}", "epochs=null", "time_budget_min=null"]
    recipe = load_train_config(config.recipe or RECIPE, [*config.overrides, f"data.train={config.data}", *budget,
                                                         f"device={config.device}"])
    if recipe.model.name != "vit_segmenter":
        raise UserError(f"experiment pos-embedding compares positional mechanisms of a ViT; the recipe trains "
                        f"{recipe.model.name!r} (expected model.name: vit_segmenter)")
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown or not config.variants:
        raise UserError(f"--variants {','.join(config.variants)}: expected some of {', '.join(VARIANTS)}")
    if config.seeds < 1 or not config.scales or min(config.scales) <= 0:
        raise UserError("--seeds must be >= 1 and --scales positive factors")
    return recipe


def run_pos_embedding(config: PosEmbeddingConfig) -> PosEmbeddingResult:
    recipe = base_recipe(config)
    device = resolve_device(config.device)
    run_dir = RunDir(config.out)
    # where it runs is not part of the setup: an experiment may resume on another device
    journal = Journal(run_dir, "experiment pos-embedding", {"recipe": replace(recipe, out="", device=""),
                                                           "scales": config.scales,
                                                           "probe_images": config.probe_images},
                      resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "experiment pos-embedding", **vars(config)})
    spec, split = val_spec(recipe)
    val = load_dataset(spec, split=split)
    short_side = min(recipe.data.base_size) if recipe.data.base_size else None
    units = [f"{variant}/seed{seed}" for seed in range(config.seeds) for variant in config.variants]
    for unit in journal.announce(units, "trained and evaluated models"):
        variant, seed = unit.split("/seed")
        out = run_dir.file(Path("runs") / f"{variant}-seed{seed}")
        trained = train(config_from_dict(to_plain(recipe), [*VARIANTS[variant], f"seed={seed}", f"out={out}"]),
                        resume=(out / LAST).exists(), progress=config.progress)
        journal.record(unit, {
            "steps": trained.step, "elapsed_s": trained.elapsed_s, "stopped_by": trained.stopped_by,
            **measure(out / LAST, val, config, short_side, device, recipe.data.val_batch_size),
        })
    runs = {unit: journal.done[unit] for unit in units}
    summary = summarize(runs, config)
    if is_main_process():
        run_dir.write_json(RESULTS, {"setup": journal.setup, "runs": runs, "summary": summary})
        run_dir.write_metrics({f"mIoU_{variant}": entry["mIoU"]["1.0"]["mean"] for variant, entry in summary.items()
                               if "1.0" in entry["mIoU"]})
        write_run_report(run_dir.path)
    return PosEmbeddingResult(runs, summary, run_dir.path)


def measure(checkpoint_path: Path, val: SegmentationDataset, config: PosEmbeddingConfig, short_side: int | None,
            device: torch.device, batch_size: int) -> dict[str, Any]:
    """mIoU at every test scale (one pass of the evaluation loop each) and the position probe."""
    checkpoint = load_checkpoint(checkpoint_path)
    classes = checkpoint.classes
    miou = {}
    for scale in config.scales:
        predictor = predictor_from_checkpoint(checkpoint, InferenceConfig(short_side=short_side, scale=scale),
                                              device=device)
        metrics = evaluate(predictor, val, [ConfusionMatrix(classes.num_classes, classes.ignore_index)],
                           batch_size=batch_size, progress=config.progress, description=f"x{scale}", device=device)
        miou[str(scale)] = metrics["mIoU"]
    return {"mIoU": miou, "probe": position_probe(checkpoint, val, config.probe_images, short_side, device)}


def position_probe(checkpoint, val: SegmentationDataset, images: int, short_side: int | None,
                   device: torch.device) -> dict[str, float]:
    """The linear probe of (row, col) from the frozen final tokens of the first `images` val images at the
    training resolution: fitted on the first half of them, measured on the other half."""
    count = min(images, len(val))
    if count < 2:
        raise UserError(f"the position probe needs at least 2 val images; the val set has {len(val)}")
    predictor = predictor_from_checkpoint(checkpoint, InferenceConfig(short_side=short_side), device=device)
    backbone = predictor.model.backbone
    tokens = []
    with torch.inference_mode():
        for index in range(count):
            x = predictor.prepare(val[index]["image"][None].to(device))
            features, grid, _ = backbone.forward_features(pad_to_multiple(x, predictor.divisor))
            tokens.append((features[0].float().cpu(), grid))
    half = count // 2
    return probe_positions(tokens[:half], tokens[half:])


def summarize(runs: dict[str, dict[str, Any]], config: PosEmbeddingConfig) -> dict[str, dict[str, Any]]:
    """Per variant: mean and standard deviation over seeds of mIoU per scale and of the probe errors."""
    def spread(values: list[float]) -> dict[str, float]:
        values = [v for v in values if v is not None and not math.isnan(v)]
        return {"mean": statistics.fmean(values) if values else math.nan,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}

    summary = {}
    for variant in config.variants:
        mine = [r for unit, r in runs.items() if unit.split("/seed")[0] == variant]
        summary[variant] = {
            "mIoU": {str(s): spread([r["mIoU"][str(s)] for r in mine]) for s in config.scales},
            "probe_error_patches": spread([r["probe"]["error_patches"] for r in mine]),
            "centre_error_patches": spread([r["probe"]["centre_error_patches"] for r in mine]),
            "steps": spread([r["steps"] for r in mine]),
        }
    return summary


def resolution_rows(summary: dict[str, dict[str, Any]], scales: tuple[float, ...]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", *[f"x{s}" for s in scales], "probe error (patches)", "centre error", "steps"]
    rows = []
    for variant, entry in summary.items():
        cells = [f"{percent(entry['mIoU'][str(s)]['mean'])} ± {percent(entry['mIoU'][str(s)]['std'])}" for s in scales]
        probe, centre = entry["probe_error_patches"], entry["centre_error_patches"]
        rows.append([variant, *cells, f"{probe['mean']:.2f} ± {probe['std']:.2f}", f"{centre['mean']:.2f}",
                     f"{entry['steps']['mean']:.0f}"])
    return header, rows


def verdict(summary: dict[str, dict[str, Any]]) -> str:
    """ASG against APE and RoPE at the training resolution and on average over the other scales, in words."""
    if "asg" not in summary:
        return "ASG was not among the variants."
    def at(variant: str, scales: list[str]) -> float:
        return statistics.fmean(summary[variant]["mIoU"][s]["mean"] for s in scales)

    scales = list(summary["asg"]["mIoU"])
    other = [s for s in scales if s != "1.0"] or scales
    parts = []
    for rival in ("ape", "rope", "none"):
        if rival not in summary:
            continue
        for name, chosen in (("at x1", ["1.0"] if "1.0" in scales else scales), ("off x1 (mean)", other)):
            delta = at("asg", chosen) - at(rival, chosen)
            parts.append(f"ASG {'≥' if delta >= 0 else '<'} {rival.upper()} {name}: {100 * delta:+.2f} mIoU points")
    return "; ".join(parts) + ". Differences smaller than the standard deviations over seeds are not evidence."
