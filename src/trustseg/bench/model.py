"""`trustseg bench model`: inference img/s of a segmentation model, as a fraction of this machine's
measured matmul peak (MFU-style), for fp32 and bf16 autocast.

Every number comes from the same run. Each round times one forward of every dtype and a few
``torch.mm`` of two ``mm_size``² matrices per dtype, the order rotating from round to round, so a
neighbour's burst of load on a shared machine hits model and peak alike. The first ``warmup`` rounds
are discarded (first-call allocations, oneDNN primitive creation). img/s and peak GFLOP/s are reported
as median and best over the kept rounds; the fraction of peak compares median with median and best
with best. GFLOP per image is ``count_flops`` of one forward (a multiply-add is 2 FLOPs; norms,
activations and softmax are not counted), so the fraction understates the work a little.
"""

from __future__ import annotations

import csv
import datetime
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trustseg.bench.machine import cpu_name
from trustseg.engine.devices import autocast, describe_device, resolve_device, synchronize
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops

# short name -> (factory builder, options); the ViT presets get Segmenter's linear head
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **{
        name: ("vit_segmenter", {"backbone": name, "head": "linear"})
        for name in ("vit_ti16", "vit_s16", "vit_b16", "vit_s14", "vit_b14")
    },
    **{f"segformer_{v}": ("segformer", {"variant": v}) for v in ("b0", "b1", "b2")},
    "unet": ("unet", {"base_width": 32}),
}

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

CSV_COLUMNS = (
    "model",
    "infer_img_size",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "param_count",
    "infer_gflops",
    "dtype",
    "peak_fraction",
)


def build_bench_model(model: str, num_classes: int = 19) -> nn.Module:
    """The model behind a short name of ``MODELS``, in eval mode, with random weights."""
    if model not in MODELS:
        raise UserError(f"unknown model {model!r} for bench model; expected one of {', '.join(MODELS)}")
    builder, options = MODELS[model]
    return build_model(builder, num_classes=num_classes, **options).eval()


def check_input_size(net: nn.Module, model: str, height: int, width: int, command: str) -> None:
    """Raise `UserError`, naming the padded size, unless H and W are multiples of the model's size divisor."""
    divisor = int(getattr(net, "size_divisor", 1))
    if height % divisor or width % divisor:
        ph, pw = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
        raise UserError(
            f"{command}: {model} needs sizes divisible by {divisor}; use {ph}x{pw} instead of {height}x{width}"
        )


def bench_model(
    model: str = "vit_s16",
    *,
    size: int | Sequence[int] = (512, 512),
    batch_size: int = 1,
    num_classes: int = 19,
    dtypes: Sequence[str] = ("fp32", "bf16"),
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = None,
    mm_size: int = 2048,
    mm_reps: int = 3,
    seed: int = 0,
    csv_path: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time ``runs`` inference forwards of ``model`` per dtype, interleaved with the matmul peak.

    Args:
        model: a key of ``MODELS`` (``vit_s16``, ``segformer_b0``, ``unet``, ...).
        size: input (H, W), or one int for a square; must be a multiple of the model's size divisor.
        dtypes: any of ``fp32`` (plain) and ``bf16`` (``torch.autocast("cpu", torch.bfloat16)``; the
            matching peak is a bf16 ``torch.mm``).
        warmup: leading rounds whose timings are discarded.
        threads: intra-op threads for the run (restored afterwards); None keeps torch's setting.
        mm_size, mm_reps: side of the square peak matmul and how many are timed per dtype per round.
        csv_path: if given, append one timm-schema row per dtype (header written for a new file).
        device: where the model and the peak matmul run (``auto``, ``cpu``, ``cuda[:N]``); GPU work is
            synchronised before each clock reading.

    Returns a dict with ``config``, ``machine``, ``params_m``, ``gflops_per_image`` and, per dtype,
    ``results[dtype]`` holding the raw per-round times (``step_ms``, ``mm_ms``) and their summaries.
    """
    height, width = _parse_size(size)
    _check_args(batch_size, num_classes, dtypes, warmup, runs, threads, mm_size, mm_reps)
    target = resolve_device(device)
    net = build_bench_model(model, num_classes)
    check_input_size(net, model, height, width, "bench model")

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))
        flops = count_flops(net, tuple(x.shape))
        net, x = net.to(target), x.to(target)
        load_before = os.getloadavg()
        step_ms, mm_ms = _time_interleaved(net, x, dtypes, warmup, runs, mm_size, mm_reps)
        load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved_threads)

    gflops_per_image = flops / batch_size / 1e9
    mm_gflop = 2 * mm_size**3 / 1e9
    results = {
        name: summarize(
            step_ms[name], mm_ms[name], batch_size=batch_size, gflops_per_image=gflops_per_image, mm_gflop=mm_gflop
        )
        for name in dtypes
    }
    result: dict[str, Any] = {
        "model": model,
        "builder": MODELS[model][0],
        "options": dict(MODELS[model][1]),
        "config": {
            "height": height,
            "width": width,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "dtypes": list(dtypes),
            "warmup": warmup,
            "runs": runs,
            "mm_size": mm_size,
            "mm_reps": mm_reps,
            "seed": seed,
        },
        "machine": {
            "cpu": cpu_name(),
            "device": describe_device(target),
            "torch": torch.__version__,
            "threads": used_threads,
            "date": datetime.date.today().isoformat(),
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
        },
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "gflops_per_image": gflops_per_image,
        "results": results,
    }
    if csv_path is not None:
        write_csv_rows(result, csv_path)
    return result


def summarize(
    step_ms: Sequence[float], mm_ms: Sequence[float], *, batch_size: int, gflops_per_image: float, mm_gflop: float
) -> dict[str, Any]:
    """Median/best img/s, achieved GFLOP/s, matmul peak and fraction of peak from raw times (ms)."""
    step_median, step_best = statistics.median(step_ms), min(step_ms)
    mm_median, mm_best = statistics.median(mm_ms), min(mm_ms)
    img_s_median, img_s_best = batch_size * 1e3 / step_median, batch_size * 1e3 / step_best
    peak_median, peak_best = mm_gflop * 1e3 / mm_median, mm_gflop * 1e3 / mm_best
    achieved_median, achieved_best = gflops_per_image * img_s_median, gflops_per_image * img_s_best
    return {
        "step_ms": list(step_ms),
        "mm_ms": list(mm_ms),
        "step_ms_median": step_median,
        "step_ms_best": step_best,
        "img_per_s_median": img_s_median,
        "img_per_s_best": img_s_best,
        "achieved_gflops_median": achieved_median,
        "achieved_gflops_best": achieved_best,
        "peak_gflops_median": peak_median,
        "peak_gflops_best": peak_best,
        "peak_fraction_median": achieved_median / peak_median,
        "peak_fraction_best": achieved_best / peak_best,
    }


def write_csv_rows(result: dict[str, Any], path: str | Path) -> None:
    """Append one timm-schema row per dtype (step time in ms per batch, params in M, GFLOP per image)."""
    path = Path(path)
    c = result["config"]
    img_size = str(c["height"]) if c["height"] == c["width"] else f"{c['height']}x{c['width']}"
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for dtype, r in result["results"].items():
            writer.writerow(
                {
                    "model": result["model"],
                    "infer_img_size": img_size,
                    "infer_samples_per_sec": f"{r['img_per_s_median']:.3f}",
                    "infer_step_time": f"{r['step_ms_median']:.2f}",
                    "infer_batch_size": c["batch_size"],
                    "param_count": f"{result['params_m']:.2f}",
                    "infer_gflops": f"{result['gflops_per_image']:.3f}",
                    "dtype": dtype,
                    "peak_fraction": f"{r['peak_fraction_median']:.4f}",
                }
            )


def format_model_bench(result: dict[str, Any]) -> str:
    """A plain-text table of ``bench_model``'s result (no rich markup, so any console prints it)."""
    c, m = result["config"], result["machine"]
    lines = [
        f"{result['model']} ({result['builder']} {result['options']}): "
        f"{c['height']}x{c['width']}, batch {c['batch_size']}, "
        f"{result['params_m']:.2f} M params, {result['gflops_per_image']:.2f} GFLOP/img; "
        f"{c['runs']} runs after {c['warmup']} warm-up, interleaved with {c['mm_reps']}x torch.mm {c['mm_size']}²",
        f"{m['cpu']}, torch {m['torch']} ({m['threads']} threads), {m['date']}, load average "
        f"{m['load_average_before'][0]:.2f} before / {m['load_average_after'][0]:.2f} after",
        "",
        f"{'dtype':6}{'img/s median':>14}{'best':>8}{'ms/batch':>10}{'GFLOP/s':>9}"
        f"{'mm peak GFLOP/s':>17}{'best':>7}{'% of peak':>11}{'best':>7}",
    ]
    for dtype, r in result["results"].items():
        lines.append(
            f"{dtype:6}{r['img_per_s_median']:>14.2f}{r['img_per_s_best']:>8.2f}{r['step_ms_median']:>10.1f}"
            f"{r['achieved_gflops_median']:>9.1f}{r['peak_gflops_median']:>17.1f}{r['peak_gflops_best']:>7.1f}"
            f"{r['peak_fraction_median']:>11.1%}{r['peak_fraction_best']:>7.1%}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _time_interleaved(
    net: nn.Module, x: torch.Tensor, dtypes: Sequence[str], warmup: int, runs: int, mm_size: int, mm_reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per dtype: ms of each kept model forward (one per round) and of each kept peak matmul."""
    g = torch.Generator().manual_seed(1)
    mats = {name: [torch.randn(mm_size, mm_size, generator=g).to(x.device, DTYPES[name]) for _ in range(2)]
            for name in dtypes}
    tasks: list[tuple[str, str, Callable[[], Any]]] = []
    for name in dtypes:
        tasks.append(("model", name, _forward(net, x, name)))
        a, b = mats[name]
        tasks.append(("mm", name, lambda a=a, b=b: torch.mm(a, b)))
    step_ms: dict[str, list[float]] = {name: [] for name in dtypes}
    mm_ms: dict[str, list[float]] = {name: [] for name in dtypes}
    for round_ in range(warmup + runs):
        shift = round_ % len(tasks)
        for kind, name, fn in tasks[shift:] + tasks[:shift]:
            for _ in range(1 if kind == "model" else mm_reps):
                synchronize(x.device)
                start = time.perf_counter()
                fn()
                synchronize(x.device)
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if round_ >= warmup:
                    (step_ms if kind == "model" else mm_ms)[name].append(elapsed_ms)
    return step_ms, mm_ms


def _forward(net: nn.Module, x: torch.Tensor, dtype: str) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode(), autocast(x.device, bf16=dtype == "bf16"):
            return net(x)

    return run


def _parse_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"bench model: size must be one int or (height, width) >= 1, got {size}")
    return size[0], size[1]


def _check_args(
    batch_size: int,
    num_classes: int,
    dtypes: Sequence[str],
    warmup: int,
    runs: int,
    threads: int | None,
    mm_size: int,
    mm_reps: int,
) -> None:
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("num_classes", num_classes, 1),
        ("warmup", warmup, 0),
        ("runs", runs, 1),
        ("mm_size", mm_size, 1),
        ("mm_reps", mm_reps, 1),
    ):
        if value < least:
            raise UserError(f"bench model: {name} must be >= {least}, got {value}")
    if threads is not None and threads < 1:
        raise UserError(f"bench model: threads must be >= 1, got {threads}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes or len(set(dtypes)) != len(dtypes):
        raise UserError(f"bench model: dtypes must be distinct names from {', '.join(DTYPES)}, got {list(dtypes)}")
