"""One-file checkpoints: everything `trustseg eval --checkpoint F` needs, written atomically.

A checkpoint holds the model recipe (builder name + options), its weights, the class metadata, the
input normalisation, the training config, optional training state (optimizer, step) for resuming and
an optional post-hoc calibrator that every prediction from it passes through, and the optional learned
state of its token reduction (CTS's policy network, ``compress/cts.py``).
Files hold only tensors and plain Python containers, so they load with ``weights_only=True``.
"""

from __future__ import annotations

import math
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
    """A trained model and what is needed to use it: `model` = {"name": builder, "options": {...}}, plus
    ``"token_reduction": "tome:r=8"`` for a model that `trustseg compress` made merge tokens."""

    model: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    classes: ClassInfo
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_config: dict[str, Any] = field(default_factory=dict)
    training_state: dict[str, Any] = field(default_factory=dict)
    # a fitted post-hoc calibrator that eval/predict apply: {"method": name, "state_dict": {...}}
    calibrator: dict[str, Any] | None = None
    # weights of the learned part of the token reduction recorded in model["token_reduction"] (CTS's policy)
    token_policy: dict[str, torch.Tensor] | None = None
    # what the checkpoint was read from, for messages (not saved)
    source: str = field(default="checkpoint", compare=False, repr=False)

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
            "token_policy": self.token_policy,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str) -> Checkpoint:
        """The checkpoint in a loaded `payload`, every field checked, so that a damaged or foreign file
        fails here in one line naming `source`, not later in a model builder or a forward pass."""
        missing = [key for key in ("model", "state_dict", "classes", "mean", "std") if key not in payload]
        _expect(not missing, source, missing[0] if missing else "", "present")
        model, classes, calibrator = payload["model"], payload["classes"], payload.get("calibrator")
        token_policy = payload.get("token_policy")
        _expect(isinstance(model, dict) and isinstance(model.get("name"), str)
                and _is_options(model.get("options", {})),
                source, "model", "{'name': builder name, 'options': {name: value}}")
        _expect(isinstance(model.get("token_reduction", ""), str), source, "model.token_reduction",
                "a compression spec such as 'tome:r=8'")
        _expect(_is_tensors(payload["state_dict"]), source, "state_dict", "a dict of named tensors")
        _expect(isinstance(classes, dict) and {"names", "palette", "ignore_index"} <= set(classes), source, "classes",
                "names, palette and ignore_index")
        names, palette, ignore_index = classes["names"], classes["palette"], classes["ignore_index"]
        _expect(isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) for n in names),
                source, "classes.names", "a list of class names")
        _expect(isinstance(palette, (list, tuple)) and all(_is_colour(c) for c in palette), source, "classes.palette",
                "one [R, G, B] colour (0..255) per class")
        _expect(_is_int(ignore_index), source, "classes.ignore_index", "an int")
        for key in ("mean", "std"):
            value = payload[key]
            positive = key == "std"
            _expect(isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)
                    and (not positive or min(value) > 0), source, key, "three finite numbers" + " > 0" * positive)
        for key in ("train_config", "training_state"):
            _expect(isinstance(payload.get(key, {}), dict), source, key, "a mapping")
        _expect(calibrator is None or (isinstance(calibrator, dict) and isinstance(calibrator.get("method"), str)
                                       and _is_tensors(calibrator.get("state_dict"))),
                source, "calibrator", "null or {'method': name, 'state_dict': a dict of named tensors}")
        _expect(token_policy is None or _is_tensors(token_policy), source, "token_policy",
                "null or a dict of named tensors")
        try:
            class_info = ClassInfo(names=tuple(names), palette=tuple(tuple(int(v) for v in c) for c in palette),
                                   ignore_index=int(ignore_index))
        except ValueError as error:
            raise UserError(f"{source}: not a trustseg checkpoint (classes: {error})") from None
        return cls(
            model={"name": model["name"], "options": dict(model.get("options", {})),
                   **({"token_reduction": model["token_reduction"]} if "token_reduction" in model else {})},
            state_dict=payload["state_dict"],
            classes=class_info,
            mean=tuple(float(v) for v in payload["mean"]),
            std=tuple(float(v) for v in payload["std"]),
            train_config=dict(payload.get("train_config", {})),
            training_state=dict(payload.get("training_state", {})),
            calibrator=calibrator,
            token_policy=token_policy,
            source=source,
        )


def _expect(ok: bool, source: str, field: str, expected: str) -> None:
    if not ok:
        raise UserError(f"{source}: not a trustseg checkpoint (field {field}: expected {expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_colour(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in value)


def _is_options(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _is_tensors(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


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
    if not isinstance(payload, dict) or not (_is_int(payload.get("format_version"))
                                            and payload["format_version"] == FORMAT_VERSION):
        raise UserError(f"checkpoint {path} is not a trustseg checkpoint (format_version {FORMAT_VERSION})")
    return Checkpoint.from_payload(payload, f"checkpoint {path}")
