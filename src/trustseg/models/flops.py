"""FLOP counting with ``torch.utils.flop_counter`` (matmuls, convolutions and attention).

Conventions are torch's: a multiply-add is 2 FLOPs; bias adds, norms, activations and softmax are not
counted. torch 2.13 has no formula for the CPU flash-attention kernels, so attention would read as
0 FLOPs on CPU; ``register_cpu_sdpa_flops()`` adds them (``count_flops`` calls it for you).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_cpu_sdpa_flops() -> None:
    """Register FLOP formulas for ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ backward).

    Idempotent; does nothing for an op that already has a formula (a later torch may ship one).
    """
    for op, formula in (
        (_aten._scaled_dot_product_flash_attention_for_cpu, _cpu_sdpa_flop),
        (_aten._scaled_dot_product_flash_attention_for_cpu_backward, _cpu_sdpa_backward_flop),
    ):
        if op not in flop_counter.flop_registry:
            register_flop_formula(op)(formula)


def count_flops(model: nn.Module, input_shape: Sequence[int] | torch.Tensor, *, backward: bool = False) -> int:
    """FLOPs of one forward (and, with ``backward=True``, backward) pass on a random input.

    Args:
        model: the module; called as ``model(x)`` with ``x`` of ``input_shape`` (e.g. (1, 3, 512, 512)),
            on the device and dtype of its first parameter. Its train/eval mode is left as it is.
        input_shape: the shape, or the input itself where the work depends on the content (e.g.
            ALGM's token merging merges more on flat images).
        backward: also count the backward pass of ``output.float().sum()``.
    """
    register_cpu_sdpa_flops()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(input_shape, torch.Tensor):
        x = input_shape.to(device=device, dtype=dtype)
    else:
        x = torch.randn(*input_shape, device=device, dtype=dtype)
    saved_grads = {p: p.grad for p in model.parameters()}  # leave the caller's gradients untouched
    counter = FlopCounterMode(display=False)
    try:
        with torch.set_grad_enabled(backward), counter:
            out = model(x)
            if backward:
                out = out[0] if isinstance(out, (tuple, list)) else out
                out.float().sum().backward()
    finally:
        for p, grad in saved_grads.items():
            p.grad = grad
    return int(counter.get_total_flops())
