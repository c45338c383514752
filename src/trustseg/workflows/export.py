"""`trustseg export`: a checkpoint's predictor as one ONNX file, checked against torch before it is trusted.

The graph is what `trustseg predict` runs on a whole image: raw images in [0, 255] (B, 3, H, W) of
any batch and size -> normalise with the checkpoint's mean/std -> pad to the size divisor -> model ->
crop -> the checkpoint's calibrator (unless ``logits_only``) -> logits (B, K, H, W). Classes, palette,
normalisation and calibrator are in the file's metadata, so ``predict --onnx`` needs nothing else.

After export the file is run by onnxruntime on random images of two sizes and batch sizes (and on the
images of ``check_images``), on the CPU and, with a CUDA device and provider, on the GPU; the results
go to ``<name>.export.json`` next to the model. A failed check is a bug (RuntimeError, exit 1); the
file is kept for inspection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import trustseg
from trustseg.data.readers import read_image
from trustseg.engine.checkpoint import atomic_write, load_checkpoint
from trustseg.engine.devices import resolve_device
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.errors import UserError
from trustseg.export.graph import DEFAULT_OPSET, EXPORTERS, MIN_OPSET, TORCHSCRIPT_MAX_OPSET, export_graph
from trustseg.export.metadata import build_metadata
from trustseg.export.parity import DEFAULT_ATOL, check_parity, parity_shapes, random_images
from trustseg.export.runtime import open_session, require
from trustseg.workflows.prediction import list_images

FORMATS = ("onnx",)
MAX_OPSET = 23
MAX_CHECK_IMAGES = 8


@dataclass(frozen=True)
class ExportConfig:
    """`exporter`: auto (dynamo, falling back to the TorchScript tracer) | dynamo | torchscript.
    `check_images`: an image file or folder whose first `MAX_CHECK_IMAGES` images are also checked."""

    checkpoint: str
    out: str
    format: str = "onnx"
    opset: int = DEFAULT_OPSET
    logits_only: bool = False
    exporter: str = "auto"
    device: str = "auto"
    check_images: str | None = None
    atol: float = DEFAULT_ATOL
    seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.exporter not in EXPORTERS:
            raise UserError(f"--exporter {self.exporter!r}: expected one of {', '.join(EXPORTERS)}")
        top = TORCHSCRIPT_MAX_OPSET if self.exporter == "torchscript" else MAX_OPSET
        if not MIN_OPSET <= self.opset <= top:
            raise UserError(f"--opset {self.opset}: expected {MIN_OPSET}..{top} (attention needs >= {MIN_OPSET})")
        if not self.atol > 0:
            raise UserError(f"atol {self.atol}: expected a tolerance > 0")


@dataclass
class ExportResult:
    path: Path
    report_path: Path
    report: dict[str, Any]


def report_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.export.json`` beside it."""
    path = Path(model_path)
    return path.with_name(path.stem + ".export.json")


def run_export(config: ExportConfig) -> ExportResult:
    require("onnx", "onnxruntime", *(("onnxscript",) if config.exporter != "torchscript" else ()))
    checkpoint = load_checkpoint(config.checkpoint)
    out = Path(config.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; expected the .onnx file to write, e.g. {out / 'model.onnx'}")
    device = resolve_device(config.device)
    paths = list_images(config.check_images, option="--check-images") if config.check_images else []
    real = [read_image(path)[None].float() for path in paths[:MAX_CHECK_IMAGES]]
    calibrated = not config.logits_only and checkpoint.calibrator is not None
    predictor = predictor_from_checkpoint(checkpoint, InferenceConfig(), calibrated=calibrated, device="cpu")
    metadata = build_metadata(checkpoint, size_divisor=predictor.divisor, calibrated=calibrated,
                              version=trustseg.__version__)
    export = export_graph(predictor, out, divisor=predictor.divisor, opset=config.opset, exporter=config.exporter,
                          metadata=metadata, seed=config.seed)
    images = random_images(parity_shapes(predictor.divisor), seed=config.seed + 1)
    parity = {"cpu": check_parity(predictor, open_session(out, "cpu"), [*images, *real], atol=config.atol)}
    if device.type == "cuda":
        parity[str(device)] = _cuda_parity(predictor.to(device), out, device, [*images, *real], config.atol)
    report = {
        "checkpoint": config.checkpoint,
        "model": checkpoint.model,
        "file": str(out),
        "bytes": out.stat().st_size,
        "logits": "calibrated" if calibrated else "raw",
        "calibrator": checkpoint.calibrator["method"] if calibrated else None,
        "size_divisor": predictor.divisor,
        "export": export,
        "atol": config.atol,
        "random_shapes": [list(i.shape) for i in images],
        "check_images": len(real),
        "parity": parity,
        "torch": torch.__version__,
        "trustseg": trustseg.__version__,
    }
    failed = [(where, check) for where, checks in parity.items() if isinstance(checks, list)
              for check in checks if not check["ok"]]
    report["ok"] = not failed
    path = report_path(out)
    atomic_write(path, lambda handle: handle.write(json.dumps(report, indent=2).encode()))
    if failed:
        where, check = failed[0]
        raise RuntimeError(f"the exported graph {out} disagrees with torch on {where} for input {check['shape']} "
                           f"(max |diff| {check.get('max_abs_diff')}, argmax flips beyond tolerance "
                           f"{check.get('argmax_flips_beyond_tolerance')}; atol {config.atol}); "
                           f"exporter {export['exporter']}; details in {path}, the file is kept for inspection")
    return ExportResult(path=out, report_path=path, report=report)


def summary_lines(result: ExportResult) -> list[str]:
    """What `trustseg export` prints: the worst agreement per runtime, then what was written."""
    report, lines = result.report, []
    for where, checks in report["parity"].items():
        if isinstance(checks, str):
            lines.append(f"onnxruntime {where}: {checks}")
            continue
        worst = max(c["max_abs_diff"] for c in checks)
        agreement = min(c["argmax_agreement"] for c in checks)
        lines.append(f"onnxruntime {where}: {len(checks)} inputs, max |logit diff| {worst:.2e} "
                     f"(atol {report['atol']:g}), argmax agreement {agreement:.2%}")
    lines.append(f"{report['logits']} logits, {report['export']['exporter']} exporter, opset "
                 f"{report['export']['opset']}: {result.path} ({report['bytes'] / 1e6:.1f} MB); "
                 f"report {result.report_path}")
    return lines


def _cuda_parity(predictor, out: Path, device: torch.device, images, atol: float) -> list[dict[str, Any]] | str:
    """Parity on the GPU, or why it was skipped (an onnxruntime without the CUDA provider)."""
    (ort,) = require("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "skipped: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    return check_parity(predictor, open_session(out, device), images, device=device, atol=atol)
