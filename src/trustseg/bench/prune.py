"""Latency of a structurally pruned ViT segmenter against the unpruned one (default: ViT-S/16 with the
linear head, 512x512, batch 1, fp32, CPU).

The unpruned model (random weights) is pruned to ``flops_ratio`` of its FLOPs with magnitude
importance (``compress/prune.py``). Each round times one forward of each model, the order alternating
from round to round (unpruned first, then pruned first), so that load from other processes on a shared
machine and cache effects hit both alike. The first ``warmup`` rounds are discarded; the result holds
the raw times, their medians and ``latency_ratio`` = median pruned / median unpruned.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Any

import torch
from torch import nn

from trustseg.bench.machine import cpu_name
from trustseg.compress.prune import prune_model
from trustseg.engine.devices import describe_device, resolve_device, synchronize
from trustseg.errors import UserError
from trustseg.models.factory import build_model


def _forward_ms(model: nn.Module, x: torch.Tensor) -> float:
    synchronize(x.device)
    start = time.perf_counter()
    model(x)
    synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


def bench_prune(
    *,
    backbone: str = "vit_s16",
    size: tuple[int, int] = (512, 512),
    batch_size: int = 1,
    flops_ratio: float = 0.5,
    warmup: int = 2,
    runs: int = 10,
    depth: int | None = None,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median forward latency (ms) of the unpruned and the pruned model, interleaved.

    Args:
        backbone: a ViT preset of ``vit_segmenter`` (``vit_ti16``, ``vit_s16``, ...); `depth` overrides
            its block count (small models for tests).
        size: input (H, W); FLOPs are counted and the target met at this size.
        threads: intra-op threads for the run (restored afterwards); None keeps torch's setting.
    """
    for name, value, low in (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("runs", runs, 1)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"bench prune: {name}={value!r}; expected an int >= {low}")
    target = resolve_device(device)
    torch.manual_seed(seed)
    options: dict[str, Any] = {"backbone": backbone} if depth is None else {"backbone": backbone, "depth": depth}
    unpruned = build_model("vit_segmenter", num_classes=19, **options).eval()
    pruned, report = prune_model(unpruned, flops_ratio, importance="magnitude", image_size=size)
    unpruned, pruned = unpruned.to(target), pruned.eval().to(target)
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(seed)).to(target)

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"unpruned": [], "pruned": []}
    try:
        load_before = os.getloadavg()
        with torch.inference_mode():
            for round_index in range(warmup + runs):
                order = ("unpruned", "pruned") if round_index % 2 == 0 else ("pruned", "unpruned")
                measured = {name: _forward_ms(unpruned if name == "unpruned" else pruned, x) for name in order}
                if round_index >= warmup:
                    for name, ms in measured.items():
                        times[name].append(ms)
        load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved_threads)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "config": {"backbone": backbone, "depth": depth, "height": size[0], "width": size[1],
                   "batch_size": batch_size, "flops_ratio_target": flops_ratio, "warmup": warmup, "runs": runs,
                   "seed": seed, "importance": "magnitude"},
        "machine": {"cpu": cpu_name(), "device": describe_device(target), "torch": torch.__version__,
                    "threads": used_threads, "date": datetime.date.today().isoformat(),
                    "load_average_before": list(load_before), "load_average_after": list(load_after)},
        "flops_ratio": report["flops_ratio"],
        "gflops_per_image_unpruned": report["flops_original"] / 1e9,
        "gflops_per_image_pruned": report["flops_pruned"] / 1e9,
        "params_m_unpruned": report["params_original"] / 1e6,
        "params_m_pruned": report["params_pruned"] / 1e6,
        "block_heads": report["block_heads"],
        "block_mlp_hidden": report["block_mlp_hidden"],
        "latency_ms": times,
        "latency_ms_median": medians,
        "latency_ratio": medians["pruned"] / medians["unpruned"],
    }
