"""`trustseg bench corruptions`: our batched corruptions against the reference ``imagecorruptions``
package (one image at a time on the CPU, as it is used), on the same images, side by side in one run.

Every round times, for each corruption, ours on the whole batch and the reference on each image of it,
the order of the two alternating from round to round. A warm-up round is discarded (first-call
allocations, cuDNN's set-up, the reference's numba JIT for glass blur). Ours runs on ``device`` with
the batch already there (as ``trustseg robustness`` holds it), timed to the end of its device work.
Reported per image: the median over rounds and the best; the speed-up compares median with median.
The geometric mean is over corruptions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trustseg.bench.machine import cpu_name
from trustseg.data.spec import load_dataset
from trustseg.data.transforms import resize_image
from trustseg.engine.devices import describe_device, resolve_device, synchronize
from trustseg.errors import UserError
from trustseg.robustness.corruptions import CORRUPTIONS, corrupt, ops


def _reference():
    try:
        import imagecorruptions
    except ImportError:
        raise UserError("bench corruptions compares with the reference package: pip install imagecorruptions-imaug") from None
    return imagecorruptions


def bench_images(data: str, num_images: int, height: int, width: int) -> torch.Tensor:
    """The first ``num_images`` images of ``data`` resized to (height, width): uint8 (N, 3, H, W)."""
    dataset = load_dataset(data)
    if len(dataset) < num_images:
        raise UserError(f"{data} has {len(dataset)} images; the benchmark needs {num_images}")
    return torch.stack([resize_image(dataset[i]["image"], (height, width)) for i in range(num_images)])


def bench_corruptions(
    *,
    data: str = "synthetic#split=val",
    num_images: int = 16,
    height: int = 512,
    width: int = 1024,
    severity: int = 3,
    rounds: int = 3,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    seed: int = 0,
    device: str = "cpu",
    backend: str | None = None,
) -> dict[str, Any]:
    """Time ours on ``device`` (filters on ``backend``, None: chosen by the device) against the reference."""
    reference = _reference()
    images = bench_images(data, num_images, height, width)
    arrays = [np.ascontiguousarray(image.permute(1, 2, 0).numpy()) for image in images]
    device = resolve_device(device)
    on_device = images.to(device)

    def ours(name: str) -> float:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        synchronize(device)
        start = time.perf_counter()
        with ops.use_backend(backend):
            corrupt(on_device, name, severity, generators)
        synchronize(device)
        return time.perf_counter() - start

    def theirs(name: str) -> float:
        np.random.seed(seed)
        start = time.perf_counter()
        for array in arrays:
            reference.corrupt(array, severity=severity, corruption_name=name)
        return time.perf_counter() - start

    rows = []
    for name in corruptions:
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        for round_ in range(rounds + 1):
            order = (("ours", ours), ("reference", theirs)) if round_ % 2 else (("reference", theirs), ("ours", ours))
            for label, run in order:
                elapsed = run(name)
                if round_ > 0:
                    times[label].append(1000 * elapsed / num_images)
        ours_ms, ref_ms = statistics.median(times["ours"]), statistics.median(times["reference"])
        rows.append({"corruption": name, "ours_ms": ours_ms, "ours_best_ms": min(times["ours"]),
                     "reference_ms": ref_ms, "reference_best_ms": min(times["reference"]),
                     "speedup": ref_ms / ours_ms})
    speedups = [row["speedup"] for row in rows]
    return {
        "rows": rows,
        "geomean_speedup": math.exp(sum(map(math.log, speedups)) / len(speedups)),
        "slowest_ratio": min(speedups),
        "setup": {"data": data, "num_images": num_images, "height": height, "width": width, "severity": severity,
                  "rounds": rounds, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "device": describe_device(device), "backend": backend or ops.backend(on_device),
                  "torch": torch.__version__, "reference": f"imagecorruptions {_version()}"},
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for package in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "unknown"


def format_corruptions_bench(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [
        f"corruptions: {setup['num_images']} images of {setup['height']}x{setup['width']} from {setup['data']}, "
        f"severity {setup['severity']}, {setup['rounds']} rounds, ours on {setup['device']} ({setup['backend']} "
        f"filters), {setup['threads']} threads, {setup['cpu']}, torch {setup['torch']}, reference "
        f"{setup['reference']} on the CPU",
        "| corruption | ours ms/img (median / best) | reference ms/img (median / best) | speed-up |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['corruption']} | {row['ours_ms']:.2f} / {row['ours_best_ms']:.2f} | "
                     f"{row['reference_ms']:.2f} / {row['reference_best_ms']:.2f} | {row['speedup']:.1f}x |")
    lines.append(f"geometric-mean speed-up {result['geomean_speedup']:.1f}x; slowest corruption at "
                 f"{result['slowest_ratio']:.2f}x")
    return "\n".join(lines)
