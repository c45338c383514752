"""`trustseg bench calibration`: CalibrationHistogram against torchmetrics' MulticlassCalibrationError, and
its cost within an evaluation pass.

One stream of logits (a pool of blocky label maps, see `make_logits_pool`) goes through seven timed
stages, which alternate batch by batch (their order alternates too, `_time_interleaved`):

- ``eval_pass``: what an evaluation pays without calibration, a forward of a small real model on
  one fixed image plus the shared argmax and `ConfusionMatrix.update`;
- ``softmax``: the batch's probabilities (`Predictions.probs`), computed once per batch and shared
  by every metric that needs them;
- ``ours``: `CalibrationHistogram.update` given those cached probabilities, every metric (ECE, MCE,
  aECE, cwECE, NLL, Brier, per-image ECE) over all labelled pixels and over the class-boundary band;
- ``ours_top_label``: the same with ``classwise=False, boundary_width=0``: the top-label metrics, NLL
  and Brier over all labelled pixels, a superset of what torchmetrics' ECE computes;
- ``torchmetrics_logits``: ``MulticlassCalibrationError(n_bins=15, norm="l1", ignore_index=255)
  .update`` on the (B, K, H, W) logits, as a segmentation user calls it (it flattens, drops the
  ignored pixels and takes its own softmax);
- ``torchmetrics``: the same metric without ``ignore_index`` on the cached probabilities already
  flattened to (N, K) with the ignored pixels dropped (the flattening is untimed): its floor;
- ``flatten``: that flattening.

After every pass each of our ECEs must equal, within 1e-6, the ECE recomputed in float64 from each
torchmetrics metric's own stored confidences and accuracies, or the benchmark raises. torchmetrics' own result is
reported beside it: its scatter_add sums the bins in float32, one pixel after another, which was
2e-5 off at 16k pixels and 6e-3 at 4 M. Peak extra memory is the tensors an update allocates
(`peak_tensor_bytes`) for one batch and over the stream.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trustseg.bench.machine import machine_info
from trustseg.bench.memory import peak_tensor_bytes
from trustseg.bench.metrics import (
    IGNORE_INDEX,
    _check_args,
    _cycled_batches,
    _time_interleaved,
    _torchmetrics_version,
    make_pool,
)
from trustseg.bench.model import build_bench_model, check_input_size
from trustseg.errors import UserError
from trustseg.metrics import CalibrationHistogram, ConfusionMatrix, Predictions

NUM_BINS = 15
STAGES = ("eval_pass", "softmax", "ours", "ours_top_label", "torchmetrics_logits", "torchmetrics", "flatten")
# The goal ratios: name -> (stages summed as numerator, denominator).
RATIOS = {
    "speedup_top_label": (("torchmetrics_logits",), "ours_top_label"),
    "speedup_top_label_floor": (("torchmetrics",), "ours_top_label"),
    "speedup_all_metrics": (("torchmetrics_logits",), "ours"),
    "speedup_all_metrics_floor": (("torchmetrics",), "ours"),
    "overhead": (("ours",), "eval_pass"),
    "overhead_with_softmax": (("ours", "softmax"), "eval_pass"),
}


def _calibration_error(num_classes: int, ignore_index: int | None = None) -> Any:
    try:
        from torchmetrics.classification import MulticlassCalibrationError
    except ImportError as error:
        raise UserError("bench calibration needs torchmetrics: pip install -e '.[test]'") from error
    return MulticlassCalibrationError(num_classes, n_bins=NUM_BINS, norm="l1", ignore_index=ignore_index)


def _top_label_histogram(num_classes: int) -> CalibrationHistogram:
    return CalibrationHistogram(num_classes, classwise=False, boundary_width=0)


def _fresh_metrics(num_classes: int) -> dict[str, tuple[Any, Callable[[Any, Any], None]]]:
    """The compared metrics, new, each with how it takes a `_Batch`; timed and measured alike."""

    def cached_probs(metric: Any, batch: Any) -> None:
        metric.update(batch.preds, batch.target)

    return {
        "ours": (CalibrationHistogram(num_classes), cached_probs),
        "ours_top_label": (_top_label_histogram(num_classes), cached_probs),
        "torchmetrics_logits": (_calibration_error(num_classes, IGNORE_INDEX), lambda m, b: m.update(b.preds.logits, b.target)),
        "torchmetrics": (_calibration_error(num_classes), lambda m, b: m.update(b.flat_probs, b.flat_target)),
    }


def make_logits_pool(
    images: int, height: int, width: int, num_classes: int, ignore_fraction: float, seed: int
) -> tuple[Tensor, Tensor]:
    """(logits (N, K, H, W) float32, target (N, H, W) int64) of a confident model that is sometimes wrong.

    `make_pool`'s blocky label maps and predictions (80% right); logits are unit Gaussian noise plus a
    margin of 4 to 12 on the predicted class, so about a quarter of the pixels have a top
    probability under 0.93.
    """
    pred, target = make_pool(images, height, width, num_classes, ignore_fraction, seed)
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(images, num_classes, height, width, generator=g)
    margin = 4 + 8 * torch.rand(images, 1, height, width, generator=g)
    return logits.scatter_add_(1, pred.unsqueeze(1), margin), target


@dataclass
class _Batch:
    """One batch as every stage sees it: probabilities cached, and torchmetrics' flattened input."""

    preds: Predictions
    fresh: Predictions  # the same logits, probabilities not yet computed: for the timed softmax
    target: Tensor
    flat_probs: Tensor  # (N, K), labelled pixels only
    flat_target: Tensor


def _flatten(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    keep = target.flatten() != IGNORE_INDEX
    return probs.movedim(1, -1).reshape(-1, probs.shape[1])[keep], target.flatten()[keep]


def _prepare(logits: Tensor, target: Tensor) -> tuple[_Batch]:
    preds = Predictions(logits)
    return (_Batch(preds, Predictions(logits), target, *_flatten(preds.probs, target)),)


class _Stage:
    """A timed stage: `update(batch)` runs `fn(batch)`; `reset()` resets the metric it feeds, if any."""

    def __init__(self, fn: Callable[[_Batch], Any], metric: Any = None) -> None:
        self.fn, self.metric = fn, metric

    def update(self, batch: _Batch) -> None:
        self.fn(batch)

    def reset(self) -> None:
        if self.metric is not None:
            self.metric.reset()


def _ece_float64(confidences: Tensor, accuracies: Tensor) -> float:
    """ECE of torchmetrics' stored (N,) confidences and accuracies, its bins, summed in float64."""
    edges = torch.linspace(0, 1, NUM_BINS + 1, dtype=confidences.dtype)
    bins = torch.bucketize(confidences, edges, right=True) - 1
    gap = torch.bincount(bins, accuracies.double(), minlength=NUM_BINS + 1)
    gap -= torch.bincount(bins, confidences.double(), minlength=NUM_BINS + 1)
    return float(gap.abs().sum() / len(confidences))


def bench_calibration(
    num_images: int = 8,
    height: int = 512,
    width: int = 1024,
    num_classes: int = 19,
    ignore_fraction: float = 0.1,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
    pool_size: int = 8,
    model: str = "segformer_b0",
    threads: int | None = None,
) -> dict[str, Any]:
    """Stream `num_images` through every stage `repeats` times; return timings, ratios, memory and ECEs.

    `pool_size` distinct images (rounded up to whole batches) are generated once and cycled; memory is
    measured over one stream of them. `model` is a `bench model` name; `threads`, if given, sets
    torch's intra-op threads for the run (restored afterwards).
    """
    _check_args(num_images, height, width, num_classes, ignore_fraction, batch_size, repeats, pool_size)
    if threads is not None and threads < 1:
        raise UserError(f"threads must be >= 1, got {threads}")
    net = build_bench_model(model, num_classes)
    check_input_size(net, model, height, width, "bench calibration")
    pool_images = -(-pool_size // batch_size) * batch_size
    pool = make_logits_pool(pool_images, height, width, num_classes, ignore_fraction, seed)
    batches = _cycled_batches(*pool, num_images, batch_size)
    image = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
    metrics = _fresh_metrics(num_classes)
    ours, ours_top, tm_logits, tm = (metrics[name][0] for name in ("ours", "ours_top_label", "torchmetrics_logits", "torchmetrics"))
    confusion = ConfusionMatrix(num_classes)

    def eval_pass(batch: _Batch) -> None:
        with torch.inference_mode():
            logits = net(image[: len(batch.target)])
        confusion.update(Predictions(logits), batch.target)

    stages = {
        "eval_pass": _Stage(eval_pass, confusion),
        "softmax": _Stage(lambda b: b.fresh.probs),
        **{name: _Stage(functools.partial(update, metric), metric) for name, (metric, update) in metrics.items()},
        "flatten": _Stage(lambda b: _flatten(b.preds.probs, b.target)),
    }
    eces: dict[str, float] = {}

    def check() -> None:
        eces.update(ours=ours.compute()["ECE"], ours_top_label=ours_top.compute()["ECE"], torchmetrics=float(tm.compute()))
        for name, metric in (("torchmetrics", tm), ("torchmetrics_logits", tm_logits)):
            eces[f"{name}_float64"] = _ece_float64(torch.cat(metric.confidences), torch.cat(metric.accuracies))
        for name in ("ours", "ours_top_label"):
            for reference in ("torchmetrics_float64", "torchmetrics_logits_float64"):
                if not math.isclose(eces[name], eces[reference], rel_tol=0.0, abs_tol=1e-6):
                    raise RuntimeError(
                        f"ECE disagrees: trustseg {name} {eces[name]!r}, {reference} (from its confidences "
                        f"and accuracies) {eces[reference]!r}"
                    )

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        load_before = os.getloadavg()
        ms_per_image = _time_interleaved(stages, batches, repeats, check, _prepare)
        load_after = os.getloadavg()
        memory = _peak_memory(num_classes, _cycled_batches(*pool, pool_images, batch_size))
        machine = {**machine_info(), "torchmetrics": _torchmetrics_version()}
    finally:
        torch.set_num_threads(saved_threads)
    return _summary(
        ms_per_image,
        memory,
        eces,
        config={
            "num_images": num_images,
            "height": height,
            "width": width,
            "num_classes": num_classes,
            "ignore_fraction": ignore_fraction,
            "batch_size": batch_size,
            "repeats": repeats,
            "seed": seed,
            "pool_images": pool_images,
            "model": model,
        },
        machine={**machine, "load_average_before": load_before, "load_average_after": load_after},
    )


def _peak_memory(num_classes: int, batches: list[tuple[Tensor, Tensor]]) -> dict[str, dict[str, int]]:
    """Peak extra bytes of our update and of torchmetrics' over the first of `batches` and over all of them."""
    prepared = [_prepare(*batch)[0] for batch in batches]  # outside the count: shared by every metric
    memory = {}
    ones, streams = _fresh_metrics(num_classes), _fresh_metrics(num_classes)
    for name, (one, update) in ones.items():
        stream = streams[name][0]
        memory[name] = {
            "peak_extra_bytes_one_batch": peak_tensor_bytes(lambda: update(one, prepared[0])),
            "peak_extra_bytes_stream": peak_tensor_bytes(lambda: [update(stream, b) for b in prepared]),
        }
    return memory


def _summary(
    ms_per_image: dict[str, list[float]],
    memory: dict[str, dict[str, int]],
    eces: dict[str, float],
    config: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    """The result dict: per-stage timings, the ratios the goals are stated in, memory and ECEs."""
    result: dict[str, Any] = {"config": config, "machine": machine, "ECE": eces}
    for name in STAGES:
        times = ms_per_image[name]
        result[name] = {
            "ms_per_image_median": statistics.median(times),
            "ms_per_image_best": min(times),
            **memory.get(name, {}),
        }
    for stat in ("median", "best"):
        ms = {name: result[name][f"ms_per_image_{stat}"] for name in STAGES}
        for ratio, (numerator, denominator) in RATIOS.items():
            result[f"{ratio}_{stat}"] = sum(ms[name] for name in numerator) / ms[denominator]
    return result


def format_calibration_bench(result: dict[str, Any]) -> str:
    """A plain-text table of `bench_calibration`'s result, at most 80 columns and free of rich markup."""
    c, m = result["config"], result["machine"]
    mib = 2.0**20
    before, after = ("/".join(f"{v:.1f}" for v in m[key]) for key in ("load_average_before", "load_average_after"))
    lines = [
        f"calibration benchmark: {c['num_images']} images {c['height']}x{c['width']}, {c['num_classes']} "
        f"classes, {c['ignore_fraction']:.0%} ignored,",
        f"  batch {c['batch_size']}, {c['repeats']} repeats; torch {m['torch']} ({m['threads']} threads), "
        f"torchmetrics {m['torchmetrics']}",
        f"  {m['cpu']}, {m['date']}",
        f"  load average before {before}, after {after}",
        "",
        f"{'':30}{'ms/img median':>14}{'best':>9}{'peak MiB 1 batch/all':>23}",
    ]
    labels = {
        "eval_pass": f"eval pass ({c['model']}+mIoU)",
        "softmax": "softmax (shared)",
        "ours": "trustseg, all metrics",
        "ours_top_label": "trustseg, top-label only",
        "torchmetrics_logits": "torchmetrics on logits",
        "torchmetrics": "torchmetrics on flat probs",
        "flatten": "flatten for torchmetrics",
    }
    for name in STAGES:
        r = result[name]
        memory = ""
        if "peak_extra_bytes_one_batch" in r:
            memory = f"{r['peak_extra_bytes_one_batch'] / mib:.1f} / {r['peak_extra_bytes_stream'] / mib:.1f}"
        lines.append(f"{labels[name]:30}{r['ms_per_image_median']:>14.1f}{r['ms_per_image_best']:>9.1f}{memory:>23}")
    e = result["ECE"]
    lines.append("")
    for ratio, (numerator, denominator) in RATIOS.items():
        what = " + ".join(labels[name] for name in numerator)
        kind = "x" if ratio.startswith("speedup") else "%"
        values = [result[f"{ratio}_{stat}"] for stat in ("median", "best")]
        shown = [f"{v:.2f}x" if kind == "x" else f"{v:.1%}" for v in values]
        lines.append(f"{what} / {labels[denominator]}:")
        lines.append(f"  {shown[0]} median, {shown[1]} best")
    lines.append(
        f"ECE {e['ours']:.6f}; torchmetrics {e['torchmetrics']:.6f} (float32 sums), "
        f"{e['torchmetrics_float64']:.6f} (float64)"
    )
    return "\n".join(lines)
