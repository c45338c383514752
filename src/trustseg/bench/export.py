"""`trustseg bench export`: latency of an exported graph in onnxruntime vs the same predictor in eager torch.

Both run the predictor `trustseg export` writes (normalisation, padding, model; random weights, no
calibrator) on the same images, on the CPU, with the same number of intra-op threads (onnxruntime's
default would take every physical core). Each round times one torch forward and one onnxruntime run,
the order alternating from round to round, so load from neighbours on a shared machine hits both
alike; the first `warmup` rounds are discarded. Reported: median and best ms per batch of each and the
ratio of medians (> 1: onnxruntime is faster), with the logit agreement of the last outputs.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trustseg.bench.machine import cpu_name
from trustseg.bench.model import MODELS, build_bench_model, check_input_size
from trustseg.engine.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from trustseg.engine.inference import Predictor
from trustseg.errors import UserError
from trustseg.export.graph import DEFAULT_OPSET, export_graph
from trustseg.export.parity import compare
from trustseg.export.runtime import open_session, require, run_session


def bench_export(
    model: str = "vit_s16",
    *,
    size: Sequence[int] = (512, 512),
    batch_size: int = 1,
    num_classes: int = 19,
    warmup: int = 2,
    runs: int = 10,
    threads: int | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> dict[str, Any]:
    """Median ms per batch of `model` (a key of `bench.model.MODELS`) in eager torch and in onnxruntime.

    `size` is (H, W), a multiple of the model's size divisor; `threads` sets torch's and onnxruntime's
    intra-op threads (default: torch's current setting, restored afterwards).
    """
    require("onnx", "onnxruntime", "onnxscript", purpose="bench export")
    height, width = (int(s) for s in size)
    for name, value, least in (("batch_size", batch_size, 1), ("runs", runs, 1), ("warmup", warmup, 0),
                               ("threads", 1 if threads is None else threads, 1), ("size", min(height, width), 1)):
        if value < least:
            raise UserError(f"bench export: {name} must be >= {least}, got {value}")
    net = build_bench_model(model, num_classes)
    check_input_size(net, model, height, width, "bench export")
    predictor = Predictor(net, IMAGENET_MEAN, IMAGENET_STD).eval()
    images = torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 255

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="trustseg-bench-export-") as folder:
            path = Path(folder) / f"{model}.onnx"
            export = export_graph(predictor, path, divisor=predictor.divisor, opset=opset)
            session = open_session(path, "cpu", threads=torch.get_num_threads())
            load_before = os.getloadavg()
            times, outputs = _time_interleaved(predictor, session, images, warmup, runs)
            load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved_threads)

    summary = {name: {"ms": ms, "ms_median": statistics.median(ms), "ms_best": min(ms)} for name, ms in times.items()}
    return {
        "model": model,
        "builder": MODELS[model][0],
        "options": dict(MODELS[model][1]),
        "config": {"height": height, "width": width, "batch_size": batch_size, "num_classes": num_classes,
                   "warmup": warmup, "runs": runs, "opset": opset, "seed": seed},
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "onnxruntime": _ort_version(),
                    "threads": used_threads, "date": datetime.date.today().isoformat(),
                    "load_average_before": list(load_before), "load_average_after": list(load_after)},
        "exporter": export["exporter"],
        "export_seconds": export["seconds"],
        "results": summary,
        "speedup_median": summary["torch"]["ms_median"] / summary["onnxruntime"]["ms_median"],
        "parity": compare(outputs["torch"], outputs["onnxruntime"]),
    }


def _time_interleaved(predictor, session, images, warmup: int, runs: int):
    """ms of each kept round per runtime, and each runtime's last logits."""
    tasks = {"torch": lambda: predictor(images), "onnxruntime": lambda: run_session(session, images)}
    times: dict[str, list[float]] = {name: [] for name in tasks}
    outputs: dict[str, torch.Tensor] = {}
    order = list(tasks)
    with torch.inference_mode():
        for round_ in range(warmup + runs):
            for name in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                outputs[name] = tasks[name]()
                elapsed_ms = (time.perf_counter() - start) * 1e3
                if round_ >= warmup:
                    times[name].append(elapsed_ms)
    return times, outputs


def _ort_version() -> str:
    (ort,) = require("onnxruntime")
    return ort.__version__


def format_export_bench(result: dict[str, Any]) -> str:
    """A plain-text table of `bench_export`'s result."""
    c, m, p = result["config"], result["machine"], result["parity"]
    lines = [
        f"{result['model']} ({result['builder']} {result['options']}): {c['height']}x{c['width']}, batch "
        f"{c['batch_size']}; {c['runs']} interleaved rounds after {c['warmup']} warm-up; {result['exporter']} "
        f"exporter, opset {c['opset']} ({result['export_seconds']:.1f} s)",
        f"{m['cpu']}, torch {m['torch']}, onnxruntime {m['onnxruntime']} ({m['threads']} threads each), {m['date']}, "
        f"load average {m['load_average_before'][0]:.2f} before / {m['load_average_after'][0]:.2f} after",
        "",
        f"{'runtime':13}{'ms/batch median':>17}{'best':>10}",
    ]
    for name, r in result["results"].items():
        lines.append(f"{name:13}{r['ms_median']:>17.1f}{r['ms_best']:>10.1f}")
    lines += ["", f"onnxruntime speed-up (torch median / onnxruntime median): {result['speedup_median']:.2f}x; "
                  f"max |logit diff| {p.get('max_abs_diff', float('nan')):.2e}, argmax agreement "
                  f"{p.get('argmax_agreement', float('nan')):.2%}"]
    return "\n".join(lines)
