"""torch.distributed helpers: who am I, and sum tensors across processes (torchrun: NCCL on CUDA, gloo on CPU)."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trustseg.errors import UserError

_EXIT_BARRIER = timedelta(minutes=2)  # how long a finished process waits for its peers at exit


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors: the backend must match where the summed states live."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_environment(device: torch.device = torch.device("cpu")) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), with the backend for ``device``
    (whose tensors the collectives will sum); True if distributed."""
    if is_distributed():
        if dist.get_backend() != backend_for(device):
            raise UserError(f"this process group uses {dist.get_backend()}, but tensors on {device} need "
                            f"{backend_for(device)}; one device type per process")
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device))
    # Leave the group while the interpreter is still whole: a gloo group torn down during finalisation
    # can abort the process ("terminate called without an active exception", pytorch/pytorch#190489).
    atexit.register(leave)
    return True


def leave(*, wait: bool = True) -> None:
    """Leave the process group. With `wait`, first meet the other processes: a rank that tears its group
    down while a peer is still working (rank 0 writing the run directory, say) can abort in gloo's
    threads. A process that stops on an error leaves at once (its peers may never reach the meeting)."""
    if not is_distributed():
        return
    if wait:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=_EXIT_BARRIER)
            else:
                dist.barrier()
        except RuntimeError:  # a peer already failed; torchrun reports it
            pass
    dist.destroy_process_group()


def broadcast_from_main(value: Any) -> Any:
    """The main process's `value` (any picklable object) in every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(length: int) -> range:
    """This process's share of `length` items, strided, no padding: shards sum exactly to the whole."""
    return range(rank(), length, world_size())
