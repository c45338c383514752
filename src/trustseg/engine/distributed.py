"""torch.distributed helpers: who am I, and sum tensors across processes (torchrun, gloo on CPU)."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); True if distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    # Leave the group while the interpreter is still whole: a gloo group torn down during finalisation
    # can abort the process ("terminate called without an active exception", pytorch/pytorch#190489).
    atexit.register(_leave)
    return True


def _leave() -> None:
    if is_distributed():
        dist.destroy_process_group()


def shard_indices(length: int) -> range:
    """This process's share of `length` items, strided, no padding: shards sum exactly to the whole."""
    return range(rank(), length, world_size())
