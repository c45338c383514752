"""Resuming: read ``last.pt``, check it belongs to this config and data, capture and restore RNG states.

RNG states are stored as tensors and plain lists so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustseg.engine.checkpoint import Checkpoint, load_checkpoint
from trustseg.errors import UserError
from trustseg.engine.rundir import to_plain
from trustseg.training.config import TrainConfig

# Keys that may change between an interrupted run and its resumption: they do not change the updates.
RESUMABLE_CHANGES = {"out", "data.num_workers", "data.val_batch_size", "log_every", "checkpoint_every", "device",
                     "compile"}
TRAINING_STATE_KEYS = ("step", "elapsed_s", "optimizer", "class_weights", "history", "rng", "data_order")


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def load_resume_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise UserError(f"--resume: {path} does not exist; there is no interrupted run in {path.parent} "
                        "to continue")
    checkpoint = load_checkpoint(path)
    missing = [k for k in TRAINING_STATE_KEYS if k not in checkpoint.training_state]
    if missing:
        raise UserError(f"--resume: {path} holds no training state ({', '.join(missing)} missing); "
                        "it cannot be resumed")
    return checkpoint


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(config: TrainConfig, checkpoint: Checkpoint, *, train_size: int, steps_per_epoch: int) -> None:
    """UserError unless ``checkpoint`` was written by a run of this config on this train set."""
    saved, current = _flatten(checkpoint.train_config), _flatten(to_plain(config))
    keys = sorted(set(saved) | set(current))
    changed = [k for k in keys if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise UserError(f"--resume: the config differs from the interrupted run's ({shown}); "
                        "resume with the same config or start a new --out")
    order = checkpoint.training_state["data_order"]
    if order["train_size"] != train_size or order["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"--resume: the train set has {train_size} samples but the interrupted run had "
                        f"{order['train_size']}; resume on the same data")
