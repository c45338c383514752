"""The device a command runs on: one parameter of the engine, not a fork of the code.

``--device auto|cpu|cuda|cuda:N`` resolves here. Under torchrun each process takes ``cuda:LOCAL_RANK``
(``auto`` and ``cuda`` both mean that), so N processes on one machine use N GPUs. Autocast follows the
device type: bfloat16 on CPU and CUDA, float16 on CUDA only (training then needs a gradient scaler).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from trustseg.errors import UserError


def _local_rank() -> int | None:
    """This process's index on its machine under torchrun, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a concrete torch.device; UserError when it does not exist."""
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    local_rank = _local_rank()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    kind, _, index_text = text.partition(":")
    if kind != "cuda" or (index_text and not index_text.isdigit()):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine "
                        f"(torch {torch.__version__} sees no GPU); use --device cpu or auto")
    count = torch.cuda.device_count()
    if index_text:
        index = int(index_text)
        if local_rank is not None and index != local_rank:
            raise UserError(f"--device {name}: under torchrun every process takes cuda:LOCAL_RANK "
                            f"(this one cuda:{local_rank}); pass --device cuda or auto")
    else:
        index = local_rank or 0
    if index >= count:
        raise UserError(f"--device cuda:{index}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def autocast(device: torch.device, *, bf16: bool = False, fp16: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes on ``device``: bfloat16 or (CUDA only) float16; else nothing."""
    if bf16 and fp16:
        raise UserError("bf16 and fp16 are exclusive: choose one autocast dtype")
    if fp16 and device.type != "cuda":
        raise UserError(f"fp16 autocast needs a CUDA device (this run uses {device}); use bf16 on the CPU")
    if not (bf16 or fp16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float16)


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader keywords for batches bound for ``device``: page-locked memory for fast copies to a GPU."""
    return {"pin_memory": device.type == "cuda"}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's image and mask tensors on ``device`` (asynchronous from pinned memory)."""
    moved = dict(batch)
    for key in ("image", "mask"):
        if isinstance(moved.get(key), torch.Tensor):
            moved[key] = moved[key].to(device, non_blocking=True)
    return moved


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device) -> str:
    """``cpu``, or the GPU's name with its index, for benchmark tables and logs."""
    if device.type != "cuda":
        return device.type
    return f"{device} ({torch.cuda.get_device_name(device)})"
