"""Peak bytes of the tensors a piece of code allocates, counted exactly (no allocator noise).

CPU builds of torch keep no allocator statistics, and process RSS mixes in the Python heap and
malloc's retained pages. Instead every op's freshly allocated output storage is counted while it is
alive (a `TorchDispatchMode` sees each op; a weakref finaliser sees the storage die). Inputs, views
and in-place results reuse existing storage and are not counted; scratch memory that a kernel frees
before returning is invisible to this count.
"""

from __future__ import annotations

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
