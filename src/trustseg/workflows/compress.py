"""`trustseg compress`: compress a checkpoint one or several ways and measure what each way costs and keeps.

Every method spec (``tome:r=8``, ``prune:flops=0.5``, ``prune:flops=0.7+tome:r=4``, ...) is one unit of
the run's journal: the compressed model is built, saved as a checkpoint that `trustseg eval` loads on
its own, and measured against the uncompressed model: GFLOPs (counted on the real forward, so merging
overhead is included), parameters, latency timed side by side with the uncompressed model in the same
unit, and mIoU clean and under a corruption set through the robustness evaluation (the one loop). The
uncompressed model is a unit too, so every frontier starts from it. ``--sweep`` expands method families
into ladders of levels; the frontier (mIoU vs GFLOPs and vs latency, clean and corrupted, one curve per
family) goes to the run directory and its report.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trustseg.bench.timing import time_rotating
from trustseg.compress.apply import compress_checkpoint, needs_training_data, sweep_specs
from trustseg.compress.reducers import find_vit
from trustseg.compress.spec import family, parse_spec, spec_name
from trustseg.data.spec import load_dataset, resolve_split
from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.engine.devices import resolve_device
from trustseg.engine.distributed import init_from_environment, is_main_process
from trustseg.engine.inference import (InferenceConfig, Predictor, calibrator_from_checkpoint,
                                       model_from_checkpoint, pad_to_multiple)
from trustseg.engine.journal import Journal, file_sha256
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError
from trustseg.models.flops import count_flops
from trustseg.report.pages import write_run_report
from trustseg.report.tables import percent
from trustseg.robustness.corruptions import CORRUPTIONS
from trustseg.robustness.summary import CLEAN, condition_key
from trustseg.workflows.evaluation import checkpoint_and_data
from trustseg.workflows.robustness import evaluate_condition

RESULTS = "compression.json"
UNCOMPRESSED = "uncompressed"
# one corruption per ImageNet-C family (noise, blur, weather, digital), at a middle severity
DEFAULT_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "jpeg_compression")


@dataclass(frozen=True)
class CompressConfig:
    checkpoint: str
    data: str
    out: str
    methods: tuple[str, ...] = ()
    sweep: tuple[str, ...] = ()  # method families expanded into ladders of levels, e.g. ("tome", "prune")
    corruptions: tuple[str, ...] = DEFAULT_CORRUPTIONS
    severities: tuple[int, ...] = (3,)
    split: str | None = None  # evaluation split; None: the spec's split, else "val"
    train_split: str = "train"  # pruning importance and fine-tuning read this split
    max_images: int | None = None
    importance_batches: int = 16  # images for Taylor importance
    finetune_steps: int = 0
    policy_steps: int = 500  # training steps of a CTS policy (when the checkpoint holds none)
    cost_size: tuple[int, int] | None = None  # (H, W) for GFLOPs and latency; None: what the model sees
    cost_images: int = 8  # GFLOPs are the mean over the first images (ALGM's work depends on the content)
    latency_runs: int = 10
    batch_size: int = 1
    num_workers: int = 0
    seed: int = 0
    boundary_iou: bool = False
    calibration: bool = True
    inference: InferenceConfig = InferenceConfig()
    device: str = "auto"
    progress: bool = True
    resume: bool = False
    report: bool = True  # write report.md / report.html at the end

    def __post_init__(self) -> None:
        if not self.methods and not self.sweep:
            raise UserError("compress: give at least one --method (e.g. tome:r=8) or --sweep (e.g. tome,prune)")
        unknown = [name for name in self.corruptions if name not in CORRUPTIONS]
        if unknown:
            raise UserError(f"--corruptions: unknown corruption {unknown[0]!r}; expected names from {', '.join(CORRUPTIONS)}")
        if min(self.latency_runs, self.importance_batches, self.policy_steps, self.cost_images) < 1 \
                or self.finetune_steps < 0:
            raise UserError("compress: --latency-runs, --importance-images, --policy-steps and --cost-images must "
                            "be >= 1, --finetune-steps >= 0")


@dataclass
class CompressResult:
    baseline: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    run_dir: Path


def run_compress(config: CompressConfig) -> CompressResult:
    device = resolve_device(config.device)
    init_from_environment(device)
    checkpoint, dataset, split = checkpoint_and_data(config.checkpoint, config.data, config.split, config.max_images)
    source = model_from_checkpoint(checkpoint)
    inputs = cost_inputs(dataset, source, checkpoint, config)
    cost_size = tuple(inputs[0].shape[-2:])
    sweep = []
    if config.sweep:
        vit = find_vit(source)
        patch = vit.config.patch_size
        sweep = sweep_specs(config.sweep, vit.config.depth, (cost_size[0] // patch, cost_size[1] // patch))
    specs = [*config.methods, *sweep]
    steps = {spec_name(parse_spec(spec)): parse_spec(spec) for spec in specs}  # canonical names, duplicates merged
    train_data = None
    if any(needs_training_data(s) for s in steps.values()) or config.finetune_steps:
        train_data = load_dataset(config.data, split=resolve_split(config.data, config.train_split, "train"))

    run_dir = RunDir(config.out)
    setup = {"checkpoint_sha256": file_sha256(config.checkpoint), "data": config.data, "split": split,
             "num_images": len(dataset), "seed": config.seed, "corruptions": list(config.corruptions),
             "severities": list(config.severities), "cost_size": list(cost_size), "cost_images": len(inputs),
             "importance_batches": config.importance_batches, "finetune_steps": config.finetune_steps,
             "policy_steps": config.policy_steps,
             "calibration": config.calibration, "boundary_iou": config.boundary_iou, "inference": config.inference}
    journal = Journal(run_dir, "compress", setup, resume=config.resume)
    if is_main_process():
        run_dir.write_config({"command": "compress", **vars(config)})
    conditions = [CLEAN, *(condition_key(n, s) for n in config.corruptions for s in config.severities)]
    source_flops = _mean_flops(source, inputs)
    source_params = _params(source)

    todo = journal.announce([UNCOMPRESSED, *steps], "methods")
    for number, name in enumerate(todo, 1):
        torch.manual_seed(config.seed)
        if name == UNCOMPRESSED:
            model, compressed, record = source, checkpoint, {}
        else:
            finetune = {"steps": config.finetune_steps, "data": config.data, "teacher": config.checkpoint,
                        "out": str(run_dir.file(f"finetune/{slug(name)}")), "progress": config.progress}
            compressed, record = compress_checkpoint(
                checkpoint, steps[name], train_data=train_data, image_size=cost_size,
                importance_batches=config.importance_batches, policy_steps=config.policy_steps, seed=config.seed,
                device=device,
                finetune=finetune if config.finetune_steps else None)
            model = model_from_checkpoint(compressed)
            if is_main_process():
                save_checkpoint(compressed, run_dir.file(f"models/{slug(name)}.pt"))
        entry = _measure(model, compressed, source, dataset, conditions, inputs, config, device,
                         label=f"{name} ({number}/{len(todo)})")
        entry.update({"family": family(steps[name]) if name in steps else UNCOMPRESSED,
                      "gflops_ratio": entry["flops"] / source_flops,
                      "params_ratio": entry["params"] / source_params,
                      "checkpoint": None if name == UNCOMPRESSED else f"models/{slug(name)}.pt", **record})
        journal.record(name, entry)

    baseline = journal.done[UNCOMPRESSED]
    methods = {name: journal.done[name] for name in steps}
    if is_main_process():
        run_dir.write_json(RESULTS, {"setup": {"checkpoint": config.checkpoint, **journal.setup},
                                     "class_names": list(checkpoint.classes.names),
                                     "uncompressed": baseline, "methods": methods})
        if config.report:
            write_run_report(run_dir.path)
    return CompressResult(baseline=baseline, methods=methods, run_dir=run_dir.path)


def _measure(model: nn.Module, compressed: Checkpoint, source: nn.Module, dataset, conditions: list[str],
             inputs: list[torch.Tensor], config: CompressConfig, device: torch.device, *, label: str) -> dict[str, Any]:
    """Cost (FLOPs on `inputs`, params, latency on the first input side by side with `source`) and accuracy
    per condition of `model`."""
    model, source = model.to(device).eval(), source.to(device).eval()
    x = inputs[0].to(device)

    def forward(net: nn.Module):
        def run():
            with torch.inference_mode():
                return net(x)
        return run

    contenders = {"model": forward(model)} if model is source else {"source": forward(source), "model": forward(model)}
    times = time_rotating(contenders, runs=config.latency_runs, device=device)
    latency_ms = statistics.median(times["model"])
    speedup = 1.0 if model is source else statistics.median(times["source"]) / latency_ms
    predictor = Predictor(model, compressed.mean, compressed.std, config.inference,
                          calibrator_from_checkpoint(compressed)).to(device).eval()
    results = {key: evaluate_condition(predictor, dataset, key, compressed.classes, config,
                                       description=f"{label} {key}", device=device) for key in conditions}
    corrupted = [results[key]["mIoU"] for key in conditions if key != CLEAN]
    flops = _mean_flops(model, inputs)
    return {
        "cost_size": list(x.shape[-2:]),
        "flops": flops,
        "gflops": flops / 1e9,
        "params": _params(model),
        "latency_ms": latency_ms,
        "img_per_s": 1e3 / latency_ms,
        "speedup": speedup,
        "relative_latency": 1 / speedup,
        "clean_mIoU": results[CLEAN]["mIoU"],
        "corrupted_mIoU": _nanmean(corrupted),
        "clean_ECE": results[CLEAN].get("ECE"),
        "conditions": {key: {k: v for k, v in value.items() if k in ("mIoU", "mAcc", "aAcc", "ECE", "per_class")}
                       for key, value in results.items()},
    }


def _mean_flops(model: nn.Module, inputs: list[torch.Tensor]) -> float:
    device = next(model.parameters()).device
    return sum(count_flops(model, x.to(device)) for x in inputs) / len(inputs)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cost_inputs(dataset, model: nn.Module, checkpoint: Checkpoint, config: CompressConfig) -> list[torch.Tensor]:
    """The model inputs costs are measured on: the first `cost_images` images as the model sees them
    (normalised, resized by the inference options, padded to its stride), or resized to `cost_size`; with
    sliding-window inference, the top-left window. Each (1, 3, H, W)."""
    predictor = Predictor(model, checkpoint.mean, checkpoint.std, config.inference)
    divisor = int(getattr(model, "size_divisor", 1))
    inputs = []
    for index in range(min(config.cost_images, len(dataset))):
        with torch.no_grad():
            x = predictor.prepare(dataset[index]["image"][None])
        if config.cost_size is not None:
            x = F.interpolate(x, size=config.cost_size, mode="bilinear", align_corners=False)
        elif config.inference.mode == "slide":
            x = x[..., : config.inference.crop[0], : config.inference.crop[1]]
        inputs.append(pad_to_multiple(x, divisor))
    return inputs


def slug(name: str) -> str:
    """A method spec as a file name: 'prune:flops=0.7+tome:r=4' -> 'prune-flops0.7_tome-r4'."""
    return re.sub(r"[^A-Za-z0-9.\-_]", "", name.replace("+", "_").replace(":", "-").replace(",", "-").replace("/", "-"))


def curve_name(entry: dict[str, Any]) -> str:
    return entry["family"] + (", fine-tuned" if entry.get("finetune") else "")


def frontier_series(baseline: dict[str, Any], methods: dict[str, dict[str, Any]], x: str, y: str
                    ) -> dict[str, tuple[list[float], list[float]]]:
    """One curve per method family (fine-tuned pruning apart), from the uncompressed point through its
    levels, sorted by cost."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for entry in methods.values():
        curves.setdefault(curve_name(entry), [(baseline[x], baseline[y])]).append((entry[x], entry[y]))
    series = {}
    for name, points in curves.items():
        points.sort(reverse=True)
        series[name] = ([p[0] for p in points], [100 * p[1] for p in points])
    return series


def cost_rows(baseline: dict[str, Any], methods: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "GFLOPs", "FLOPs", "params (M)", "latency (ms)", "speed-up", "clean mIoU", "corrupted mIoU"]
    # speed-up: the uncompressed model's latency over this one's, timed in turn in the same unit
    rows = []
    for name, entry in {UNCOMPRESSED: baseline, **methods}.items():
        rows.append([name, f"{entry['gflops']:.2f}", percent(entry["gflops_ratio"]), f"{entry['params'] / 1e6:.2f}",
                     f"{entry['latency_ms']:.1f}", f"{entry['speedup']:.2f}x", percent(entry["clean_mIoU"]),
                     percent(entry["corrupted_mIoU"])])
    return header, rows
