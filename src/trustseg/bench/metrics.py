"""`trustseg bench metrics`: our ConfusionMatrix vs torchmetrics' MulticlassJaccardIndex on one stream.

Both consume the same pre-generated hard predictions and targets (B, H, W) int64, as the evaluation
loop hands them over after the shared argmax, so the timing isolates the metric update. A small
pool of distinct images is generated once and cycled, so data generation costs nothing per image.
The two updates alternate batch by batch (which one goes first alternates too), so machine noise
hits both alike; per-image times are reported as median and best over every timed batch. The mIoUs
must agree or the benchmark raises. Peak extra memory is the tensors an update allocates
(`peak_tensor_bytes`), measured over one batch and over the whole stream: a streaming state keeps
them equal.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trustseg.bench.memory import peak_tensor_bytes
from trustseg.bench.machine import machine_info
from trustseg.errors import UserError
from trustseg.metrics.confusion import ConfusionMatrix

IGNORE_INDEX = 255
_WARMUP_BATCHES = 2


def _jaccard_index(num_classes: int) -> Any:
    try:
        from torchmetrics.classification import MulticlassJaccardIndex
    except ImportError as error:
        raise UserError("bench metrics needs torchmetrics: pip install -e '.[test]'") from error
    return MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE_INDEX)


def make_pool(
    images: int, height: int, width: int, num_classes: int, ignore_fraction: float, seed: int
) -> tuple[Tensor, Tensor]:
    """(pred, target), each (N, H, W) int64: blocky label maps, 80% of predictions right, ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_classes, (images, 1, max(1, height // 16), max(1, width // 16)), generator=g)
    target = F.interpolate(coarse.float(), size=(height, width), mode="nearest")[:, 0].long()
    wrong = torch.rand(target.shape, generator=g) < 0.2
    pred = torch.where(wrong, torch.randint(0, num_classes, target.shape, generator=g), target)
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = IGNORE_INDEX
    return pred, target


def _check_args(
    num_images: int,
    height: int,
    width: int,
    num_classes: int,
    ignore_fraction: float,
    batch_size: int,
    repeats: int,
    pool_size: int,
) -> None:
    for name, value in (
        ("num_images", num_images),
        ("height", height),
        ("width", width),
        ("num_classes", num_classes),
        ("batch_size", batch_size),
        ("repeats", repeats),
        ("pool_size", pool_size),
    ):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if num_classes > IGNORE_INDEX:
        raise UserError(f"num_classes must be < {IGNORE_INDEX} (the ignore label), got {num_classes}")
    if not 0.0 <= ignore_fraction < 1.0:
        raise UserError(f"ignore_fraction must be in [0, 1), got {ignore_fraction}")


def _cycled_batches(pred: Tensor, target: Tensor, num_images: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """`num_images` images in batches that cycle through the pool (len(pool) is a multiple of batch_size)."""
    batches = []
    for start in range(0, num_images, batch_size):
        at = start % len(pred)
        size = min(batch_size, num_images - start)
        batches.append((pred[at : at + size], target[at : at + size]))  # views, no copies
    return batches


def _time_interleaved(
    metrics: dict[str, Any],
    batches: list[tuple[Tensor, Tensor]],
    repeats: int,
    check: Callable[[], None],
    prepare: Callable[[Tensor, Tensor], tuple[Any, ...]] = lambda pred, target: (pred, target),
) -> dict[str, list[float]]:
    """ms per image of every (metric, batch) update over `repeats` full passes, the metrics alternating
    batch by batch; `check()` runs after each pass. Each update gets `prepare(*batch)`, made once per
    batch and pass, untimed (default: the batch itself)."""
    for batch in batches[:_WARMUP_BATCHES]:
        args = prepare(*batch)
        for metric in metrics.values():
            metric.update(*args)
    ms_per_image: dict[str, list[float]] = {name: [] for name in metrics}
    for repeat in range(repeats):
        for metric in metrics.values():
            metric.reset()
        for i, batch in enumerate(batches):
            args = prepare(*batch)
            names = list(metrics) if (i + repeat) % 2 == 0 else list(reversed(metrics))
            for name in names:
                start = time.perf_counter()
                metrics[name].update(*args)
                ms_per_image[name].append((time.perf_counter() - start) * 1e3 / len(batch[1]))
        check()
    return ms_per_image


def bench_metrics(
    num_images: int = 200,
    height: int = 512,
    width: int = 1024,
    num_classes: int = 19,
    ignore_fraction: float = 0.1,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
    pool_size: int = 4,
) -> dict[str, Any]:
    """Stream `num_images` through both accumulators `repeats` times; return timings, memory and mIoU.

    `pool_size` distinct images (rounded up to whole batches) are generated once and cycled.
    """
    _check_args(num_images, height, width, num_classes, ignore_fraction, batch_size, repeats, pool_size)
    fresh = {
        "ours": lambda: ConfusionMatrix(num_classes, IGNORE_INDEX),
        "torchmetrics": lambda: _jaccard_index(num_classes),
    }
    metrics = {name: make() for name, make in fresh.items()}
    pool_images = -(-pool_size // batch_size) * batch_size
    pool = make_pool(pool_images, height, width, num_classes, ignore_fraction, seed)
    batches = _cycled_batches(*pool, num_images, batch_size)

    def mious() -> tuple[float, float]:
        miou, miou_tm = metrics["ours"].compute()["mIoU"], float(metrics["torchmetrics"].compute())
        if not math.isclose(miou, miou_tm, rel_tol=0.0, abs_tol=1e-6):  # torchmetrics averages in float32
            raise RuntimeError(f"mIoU disagrees: trustseg {miou!r}, torchmetrics {miou_tm!r}")
        return miou, miou_tm

    load = os.getloadavg()[0]  # other processes on a shared machine skew the medians: say so
    ms_per_image = _time_interleaved(metrics, batches, repeats, mious)
    miou, miou_tm = mious()
    result: dict[str, Any] = {
        "config": {
            "num_images": num_images,
            "height": height,
            "width": width,
            "num_classes": num_classes,
            "ignore_fraction": ignore_fraction,
            "batch_size": batch_size,
            "repeats": repeats,
            "seed": seed,
            "pool_images": pool_images,
        },
        "machine": {**machine_info(), "torchmetrics": _torchmetrics_version(), "load_average_1min": load},
        "mIoU": miou,
        "mIoU_torchmetrics": miou_tm,
    }
    for name, times in ms_per_image.items():
        median = statistics.median(times)
        result[name] = {
            "ms_per_image_median": median,
            "ms_per_image_best": min(times),
            "images_per_s": 1e3 / median,
            "peak_extra_bytes_one_batch": _peak_stream_bytes(fresh[name](), batches[:1]),
            "peak_extra_bytes_stream": _peak_stream_bytes(fresh[name](), batches),
        }
    result["ours"]["state_bytes"] = metrics["ours"].matrix.nbytes
    result["speedup_median"] = result["torchmetrics"]["ms_per_image_median"] / result["ours"]["ms_per_image_median"]
    result["speedup_best"] = result["torchmetrics"]["ms_per_image_best"] / result["ours"]["ms_per_image_best"]
    return result


def _peak_stream_bytes(metric: Any, batches: list[tuple[Tensor, Tensor]]) -> int:
    def stream() -> None:
        for pred, target in batches:
            metric.update(pred, target)

    return peak_tensor_bytes(stream)


def _torchmetrics_version() -> str:
    import torchmetrics

    return torchmetrics.__version__


def format_metrics_bench(result: dict[str, Any]) -> str:
    """A plain-text table of `bench_metrics`' result, at most 80 columns and free of rich markup."""
    c, m = result["config"], result["machine"]
    mib = 2.0**20
    lines = [
        f"metrics benchmark: {c['num_images']} images {c['height']}x{c['width']}, {c['num_classes']} classes, "
        f"{c['ignore_fraction']:.0%} ignored,",
        f"  batch {c['batch_size']}, {c['repeats']} repeats; torch {m['torch']} ({m['threads']} threads), "
        f"torchmetrics {m['torchmetrics']}",
        f"  {m['cpu']}, {m['date']}, load average {m['load_average_1min']:.1f}",
        "",
        f"{'':26}{'ms/img median':>14}{'best':>8}{'img/s':>8}{'peak MiB 1 batch/all':>23}",
    ]
    for name, label in (("ours", "trustseg ConfusionMatrix"), ("torchmetrics", "torchmetrics JaccardIndex")):
        r = result[name]
        memory = f"{r['peak_extra_bytes_one_batch'] / mib:.1f} / {r['peak_extra_bytes_stream'] / mib:.1f}"
        lines.append(
            f"{label:26}{r['ms_per_image_median']:>14.3f}{r['ms_per_image_best']:>8.3f}"
            f"{r['images_per_s']:>8.0f}{memory:>23}"
        )
    lines += [
        "",
        f"speed-up {result['speedup_median']:.1f}x (median), {result['speedup_best']:.1f}x (best); "
        f"state {result['ours']['state_bytes']} bytes",
        f"mIoU {result['mIoU']:.6f} (torchmetrics {result['mIoU_torchmetrics']:.6f})",
    ]
    return "\n".join(lines)
