"""What an exported graph carries besides its weights, as ONNX ``metadata_props`` (string -> string).

`predict --onnx` reads the classes and the normalisation from here, so the .onnx file is all it needs.
Strings are stored as they are, other values as JSON; every key starts with ``trustseg.``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from trustseg.data.base import ClassInfo
from trustseg.engine.checkpoint import Checkpoint
from trustseg.errors import UserError

PREFIX = "trustseg."
# The input contract, also written into the file so that a user of the bare graph can read it.
INPUT_CONTRACT = ("images: float32 (B, 3, H, W), RGB in [0, 255] (not normalised; the graph normalises and pads "
                  "to the size divisor itself), any B, H, W; logits: float32 (B, K, H, W)")


@dataclass(frozen=True)
class GraphInfo:
    """The metadata of an exported graph that running it needs."""

    classes: ClassInfo
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_divisor: int
    calibrator: str | None  # the method whose calibrated logits the graph returns, None for raw logits


def build_metadata(checkpoint: Checkpoint, *, size_divisor: int, calibrated: bool, version: str) -> dict[str, str]:
    """The ``metadata_props`` of the graph exported from `checkpoint` (with its calibrator if `calibrated`)."""
    calibrator = checkpoint.calibrator["method"] if calibrated and checkpoint.calibrator is not None else None
    values: dict[str, Any] = {
        "version": version,
        "input": INPUT_CONTRACT,
        "class_names": list(checkpoint.classes.names),
        "palette": [list(c) for c in checkpoint.classes.palette],
        "ignore_index": checkpoint.classes.ignore_index,
        "mean": list(checkpoint.mean),
        "std": list(checkpoint.std),
        "size_divisor": size_divisor,
        "calibrator": calibrator or "none",
        "logits": "calibrated" if calibrator else "raw",
        "model": checkpoint.model,
    }
    return {PREFIX + key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def read_metadata(props: dict[str, str], source: str) -> GraphInfo:
    """The `GraphInfo` in a graph's ``metadata_props``; UserError naming `source` if a field is missing or bad."""

    def field(key: str, text: bool = False) -> Any:
        if PREFIX + key not in props:
            raise UserError(f"{source}: not a graph exported by trustseg (metadata {PREFIX + key} is missing)")
        if text:
            return props[PREFIX + key]
        try:
            return json.loads(props[PREFIX + key])
        except json.JSONDecodeError:
            raise UserError(f"{source}: metadata {PREFIX + key} is not valid JSON") from None

    try:
        classes = ClassInfo(names=tuple(str(n) for n in field("class_names")),
                            palette=tuple(tuple(int(v) for v in c) for c in field("palette")),
                            ignore_index=int(field("ignore_index")))
        mean, std = (tuple(float(v) for v in field(key)) for key in ("mean", "std"))
        divisor, calibrator = int(field("size_divisor")), field("calibrator", text=True)
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: unreadable trustseg metadata ({error})") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or divisor < 1:
        raise UserError(f"{source}: metadata mean/std need 3 values (std > 0) and size_divisor >= 1")
    return GraphInfo(classes=classes, mean=mean, std=std, size_divisor=divisor,
                     calibrator=None if calibrator == "none" else calibrator)
