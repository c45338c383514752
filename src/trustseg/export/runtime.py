"""Run an exported graph with onnxruntime, alone or as the model of the usual `Predictor`.

The graph is the whole-image predictor (normalise, pad to the size divisor, model, crop, calibrator),
so `predict --onnx` wraps it in the same `Predictor` as `predict --checkpoint`: resizing and sliding
windows stay in one place. The graph takes raw images; `OnnxSegmenter` maps the `Predictor`'s
normalised input back to [0, 255] (the float32 round trip moves a logit by ~1e-7) and needs no
padding from it. With ``--mode slide``, ``--scale`` or ``--short-side`` an exported calibrator then
runs on each window / on the resized image, not once on the final logits: the same for temperature,
vector and matrix scaling (affine maps commute with averaging and bilinear resizing), close for
the others.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from trustseg.data.base import ClassInfo
from trustseg.engine.inference import InferenceConfig, Predictor
from trustseg.errors import UserError
from trustseg.export.metadata import GraphInfo, read_metadata

INSTALL_HINT = "pip install 'trustseg[export]'"
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def require(*modules: str, purpose: str = "ONNX export") -> list[ModuleType]:
    """Import the optional `modules`, or raise one UserError naming the ones missing and how to install them."""
    imported, missing = [], []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        needed = ", ".join(modules[:-1]) + " and " + modules[-1] if len(modules) > 1 else modules[0]
        raise UserError(f"{purpose} needs {needed} ({', '.join(missing)} not installed): {INSTALL_HINT}")
    return imported


def providers(device: torch.device) -> list[Any]:
    """onnxruntime execution providers for `device`: CUDA (TF32 off, as torch's fp32 matmuls) or the CPU."""
    (ort,) = require("onnxruntime", purpose="running an ONNX model")
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError(f"--device {device}: this onnxruntime has no CUDA execution provider "
                        "(install onnxruntime-gpu) or use --device cpu")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}), "CPUExecutionProvider"]


def open_session(path: str | Path, device: torch.device | str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime session on `path`, on `device`, with `threads` intra-op threads (default: torch's, so that
    onnxruntime and torch compare on the same cores; onnxruntime's own default takes every physical core)."""
    (ort,) = require("onnxruntime", purpose="running an ONNX model")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers(torch.device(device)))
    except Exception as error:  # onnxruntime raises its own exception types for unreadable models
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(f"{path} is not a readable ONNX model ({reason})") from None


def graph_info(session: Any, source: str) -> GraphInfo:
    return read_metadata(dict(session.get_modelmeta().custom_metadata_map), source)


def run_session(session: Any, images: torch.Tensor) -> torch.Tensor:
    """Raw images (B, 3, H, W) in [0, 255] -> logits (B, K, H, W) float32 on the images' device."""
    array = images.detach().float().contiguous().cpu().numpy()
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: array})
    return torch.from_numpy(logits).to(images.device)


class OnnxSegmenter(nn.Module):
    """The model interface of `Predictor` on an exported graph: normalised images (B, 3, H, W) of any size ->
    the graph's logits (B, K, H, W). The graph pads itself, hence ``size_divisor`` 1."""

    size_divisor = 1

    def __init__(self, session: Any, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.session = session
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, x * self.std + self.mean)


def onnx_predictor(
    path: str | Path, config: InferenceConfig = InferenceConfig(), *, device: torch.device | str = "cpu"
) -> tuple[Predictor, ClassInfo]:
    """The exported graph at `path` behind `config`'s inference on `device`, and the classes it predicts."""
    if config.bf16:
        raise UserError("--bf16 does not apply to an ONNX model (it runs the float32 graph as exported)")
    session = open_session(path, device)
    info = graph_info(session, f"--onnx {path}")
    model = OnnxSegmenter(session, info.mean, info.std)
    return Predictor(model, info.mean, info.std, config).to(device).eval(), info.classes
