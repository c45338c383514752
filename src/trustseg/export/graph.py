"""Trace a predictor (raw images -> logits) to one ONNX file with dynamic batch, height and width.

Exporters (``exporter``): "dynamo" is ``torch.onnx.export(dynamo=True)`` (torch.export, then the
onnxscript torchlib); "torchscript" is the legacy tracer with ``dynamic_axes``; "auto" tries dynamo
and falls back to the tracer if it fails, recording why. Every model of `models/` exports with dynamo.

Traps avoided (PyTorch docs "0/1 specialization"; onnxruntime #12302; the ViT's shape branches):
- the example batch is 2, since a dimension of size 1 (or 0) is specialised to a constant;
- the example size is not a multiple of the size divisor, so the padding the predictor does is traced
  (the tracer keeps the branch it takes), and its patch grid is not square, so an absolute position
  embedding (always square) is resampled in the trace rather than returned unchanged;
- height and width are declared ``Dim.DYNAMIC`` (named "height", "width"): torch.export may narrow
  their range (a calibrator's 5x5 reflect-padded conv needs H, W >= 5) but fails rather than
  silently making them constant; the parity check then runs other sizes anyway.
Weights are stored inside the file (no external ``.data`` file; ONNX's 2 GB protobuf limit applies).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from trustseg.engine.checkpoint import atomic_write
from trustseg.export.runtime import INPUT_NAME, OUTPUT_NAME, require

EXPORTERS = ("auto", "dynamo", "torchscript")
# torch's own exporter builds at opset 18 (TORCHLIB_OPSET in torch 2.6-2.13), so 18 needs no version
# conversion; opset 23 would turn SDPA into the fused Attention op, whose CPU kernel needs ORT >= 1.23.
DEFAULT_OPSET = 18
MIN_OPSET = 14  # scaled_dot_product_attention has no ONNX form below 14
TORCHSCRIPT_MAX_OPSET = 20


def example_images(divisor: int, generator: torch.Generator) -> torch.Tensor:
    """(2, 3, H, W) raw images with H, W not multiples of `divisor` (for divisor > 5) and a non-square grid:
    H pads to 5 + ceil(3 / d) rows of d pixels, W to 7 + ceil(5 / d) columns (never equal)."""
    return torch.rand(2, 3, 5 * divisor + 3, 7 * divisor + 5, generator=generator) * 255


def export_graph(
    module: nn.Module,
    path: str | Path,
    *,
    divisor: int,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    metadata: dict[str, str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export `module` (images (B, 3, H, W) -> logits (B, K, H, W), on the CPU, in eval mode) to `path`.

    The file is written atomically with `metadata` as its ``metadata_props`` and passes
    ``onnx.checker.check_model(full_check=True)``. Returns what happened: the exporter used, the
    reason dynamo failed (if "auto" fell back; also when it cannot reach `opset`), the opset, the
    input/output dimensions, seconds taken.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r}: expected one of {EXPORTERS}")
    (onnx,) = require("onnx")
    images = example_images(divisor, torch.Generator().manual_seed(seed))
    record: dict[str, Any] = {"opset": opset, "example_shape": list(images.shape)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trustseg-export-") as folder:
        traced = Path(folder) / "graph.onnx"
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(module, images, traced, opset)
                _require_opset(onnx.load(str(traced), load_external_data=False), opset)
                record["exporter"] = "dynamo"
            except Exception as error:  # torch.export raises many types; the fallback records the first line
                if exporter == "dynamo":
                    raise
                record["dynamo_error"] = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        if "exporter" not in record:
            _export_torchscript(module, images, traced, opset)
            record["exporter"] = "torchscript"
        model = onnx.load(str(traced))
    onnx.helper.set_model_props(model, metadata or {})
    onnx.checker.check_model(model, full_check=True)
    atomic_write(path, lambda handle: handle.write(model.SerializeToString()))
    record["seconds"] = time.perf_counter() - start
    record["inputs"] = {i.name: _dims(i) for i in model.graph.input}
    record["outputs"] = {o.name: _dims(o) for o in model.graph.output}
    record["opset_import"] = {d.domain or "ai.onnx": d.version for d in model.opset_import}
    return record


def _export_dynamo(module: nn.Module, images: torch.Tensor, path: Path, opset: int) -> None:
    require("onnxscript")
    dims = {0: "batch", 2: "height", 3: "width"}  # strings = Dim.DYNAMIC, the name kept as the ONNX dim_param
    with _quiet():
        program = torch.onnx.export(module, (images,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    opset_version=opset, dynamo=True, external_data=False,
                                    dynamic_shapes=(dims,), verbose=False)
        program.save(str(path))


def _require_opset(model: Any, opset: int) -> None:
    """The dynamo exporter builds at its own opset and converts; a failed conversion keeps the built
    opset with only a log message (e.g. no Pad adapter below 18), so the result is checked."""
    built = next(d.version for d in model.opset_import if d.domain in ("", "ai.onnx"))
    if built != opset:
        raise RuntimeError(f"the dynamo exporter could not convert its opset-{built} graph to opset {opset}")


def _export_torchscript(module: nn.Module, images: torch.Tensor, path: Path, opset: int) -> None:
    if opset > TORCHSCRIPT_MAX_OPSET:
        raise ValueError(f"the TorchScript exporter supports opsets up to {TORCHSCRIPT_MAX_OPSET}, not {opset}")
    axes = {0: "batch", 2: "height", 3: "width"}
    with _quiet():
        torch.onnx.export(module, (images,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' chatter (tracer warnings, 'torchvision is not installed' log lines): whether the
    trace generalises is decided by the parity check, not by warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dims(value_info: Any) -> list[int | str]:
    """An input's or output's dimensions: an int when static, its name when dynamic."""
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]
