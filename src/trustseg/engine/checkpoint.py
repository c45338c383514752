"""One-file checkpoints: everything `trustseg eval --checkpoint F` needs, written atomically.

A checkpoint holds the model recipe (builder name + options), its weights, the class metadata, the
input normalisation, the training config, optional training state (optimizer, step) for resuming and
an optional post-hoc calibrator that every prediction from it passes through.
Files hold only tensors and plain Python containers, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trustseg.data.base import ClassInfo
from trustseg.errors import UserError

FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Checkpoint:
    """A trained model and what is needed to use it: `model` = {"name": builder, "options": {...}}."""

    model: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    classes: ClassInfo
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_config: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)
    # a fitted post-hoc calibrator that eval/predict apply: {"method": name, "state_dict": {...}}
    calibrator: dict[str, Any] | None = None

    def to_payload(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "state_dict": self.state_dict,
            "classes": {
                "names": list(self.classes.names),
                "palette": [list(c) for c in self.classes.palette],
                "ignore_index": self.classes.ignore_index,
            },
            "mean": list(self.mean),
            "std": list(self.std),
            "train_config": self.train_config,
            "training_state": self.training_state,
            "calibrator": self.calibrator,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str) -> Checkpoint:
        try:
            classes = payload["classes"]
            return cls(
                model=dict(payload["model"]),
                state_dict=payload["state_dict"],
                classes=ClassInfo(
                    names=tuple(classes["names"]),
                    palette=tuple(tuple(int(v) for v in c) for c in classes["palette"]),
                    ignore_index=int(classes["ignore_index"]),
                ),
                mean=tuple(payload["mean"]),
                std=tuple(payload["std"]),
                train_config=dict(payload.get("train_config", {})),
                training_state=dict(payload.get("training_state", {})),
                calibrator=payload.get("calibrator"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{source}: not a trustseg checkpoint (missing or bad field {error})") from None


def atomic_write(path: str | Path, write) -> None:
    """Call `write(file_object)` on a temp file beside `path`, then rename it into place.

    A crash mid-write leaves the previous file intact: readers never see a half-written file. A write
    the system refuses (disk full, quota, read-only or unwritable folder) is a UserError naming the file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise UserError(f"cannot write {path}: {error.strerror or error}; {kept}") from None
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> None:
    atomic_write(path, lambda handle: torch.save(checkpoint.to_payload(), handle))


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"checkpoint {path} is unreadable ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} is not a trustseg checkpoint (format_version {FORMAT_VERSION})")
    return Checkpoint.from_payload(payload, str(path))
