"""Peak bytes of the tensors a piece of code allocates, counted exactly (no allocator noise).

CPU builds of torch keep no allocator statistics, and process RSS mixes in the Python heap and
malloc's retained pages. Instead every op's freshly allocated output storage is counted while it is
alive (a `TorchDispatchMode` sees each op; a weakref finaliser sees the storage die). Inputs, views
and in-place results reuse existing storage and are not counted; scratch memory that a kernel frees
before returning is invisible to this count.

For a whole command, allocator and Python heap included, `wait_peak_rss` reads a child process's
peak resident set size as the kernel recorded it.
"""

from __future__ import annotations

import os
import subprocess
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _TensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {id(x.untyped_storage()) for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if not isinstance(x, torch.Tensor):
                continue
            storage = x.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in inputs or key in self._tracked or nbytes == 0:
                continue
            self._tracked.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Run `fn()` and return the most bytes of tensors it had allocated and alive at one time."""
    with _TensorBytes() as counter:
        fn()
    return counter.peak


def wait_peak_rss(process: subprocess.Popen) -> int:
    """Wait for `process` and return its peak resident set size in bytes (Linux ``ru_maxrss``).

    ``os.wait4`` reports this child's own usage; ``RUSAGE_CHILDREN`` would give the maximum over every
    child waited for so far. Sets ``process.returncode``.
    """
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024  # KiB on Linux
