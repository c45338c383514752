"""Where a fresh run's weights come from: ``model.weights`` (pretrained files in a published layout)
or ``model.init_from`` (a checkpoint written by ``trustseg train``).

Either way a different number of classes re-initialises only the classifier (the keys whose shape
depends on the class count, ``models.factory.class_dependent_keys``); every other difference is a
``UserError`` naming the key and both shapes. What was loaded, newly initialised and ignored is
returned as a :class:`WeightsRecord`, which the run writes to ``weights.json``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from trustseg.engine.checkpoint import load_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import class_dependent_keys
from trustseg.models.pretrained import load_pretrained
from trustseg.models.weights import LoadReport, load_mapped
from trustseg.training.config import ModelConfig

WEIGHTS_JSON = "weights.json"


@dataclass(frozen=True)
class WeightsRecord:
    """One load: the file, what it held, and our keys loaded / newly initialised, its keys ignored."""

    key: str  # the config key that asked for it: "model.weights" or "model.init_from"
    path: str
    layout: str
    loaded: list[str]
    new: list[str]
    ignored: list[str]

    def summary(self) -> str:
        """One line, e.g. ``model.weights: 52 tensors loaded from F (segformer); 2 new (decoder.classifier.*)``."""
        line = f"{self.key}: {len(self.loaded)} tensors loaded from {self.path} ({self.layout})"
        for label, keys in (("new", self.new), ("ignored", self.ignored)):
            if keys:
                line += f"; {len(keys)} {label} ({_abbreviate(keys)})"
        return line

    def to_json(self) -> dict[str, Any]:
        counts = {"loaded": len(self.loaded), "new": len(self.new), "ignored": len(self.ignored)}
        return {"key": self.key, "path": self.path, "layout": self.layout, "counts": counts,
                "loaded": self.loaded, "new": self.new, "ignored": self.ignored}


def _abbreviate(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def resolve_weights_path(config: ModelConfig) -> str:
    """``model.weights`` with ``{option}`` fields replaced by the model options (``mit-{variant}``)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(config.weights) if name is not None]
    except ValueError as error:
        raise UserError(f"config model.weights={config.weights!r}: {error}") from None
    missing = [name for name in fields if name not in config.options]
    if missing:
        raise UserError(f"config model.weights={config.weights!r}: {{{missing[0]}}} is not one of the model "
                        f"options ({', '.join(config.options) or 'none set'})")
    return config.weights.format(**config.options)


def load_initial_weights(model: nn.Module, config: ModelConfig) -> WeightsRecord | None:
    """Load ``config.weights`` or ``config.init_from`` into ``model``; None when neither is set."""
    if config.init_from is None and config.weights is None:
        return None
    classifier = class_dependent_keys(config.name, **config.options)
    if config.init_from is not None:
        key, path = "model.init_from", config.init_from
        report, layout = _load_trustseg_checkpoint(model, config, Path(path), classifier)
    else:
        key, path = "model.weights", resolve_weights_path(config)
        report, layout = load_pretrained(config.name, model, path, reinitialise=classifier)
    new = [k for k in model.state_dict() if k in set(report.missing) | set(report.reinitialised)]
    ignored = report.dropped + report.unexpected + [f"{k} (shape differs: classifier)" for k in report.reinitialised]
    return WeightsRecord(key, str(path), layout, report.loaded(model), new, ignored)


def _load_trustseg_checkpoint(
    model: nn.Module, config: ModelConfig, path: Path, classifier: set[str]
) -> tuple[LoadReport, str]:
    checkpoint = load_checkpoint(path)
    saved = checkpoint.model.get("name")
    if saved != config.name:
        raise UserError(f"model.init_from={path}: found a trustseg {saved} checkpoint, but model.name is "
                        f"{config.name!r}; init_from needs a checkpoint of the same model")
    source = f"trustseg checkpoint {path}"
    report = load_mapped(model, checkpoint.state_dict, source=source, reinitialise=classifier)
    return report, f"trustseg {saved}, {checkpoint.classes.num_classes} classes"
