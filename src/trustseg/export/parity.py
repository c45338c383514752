"""The exported graph against the torch predictor it came from, on the same images.

Agreement is measured, not assumed: the exporters can silently bake a shape branch of the example
(PyTorch's export docs; onnxruntime fuses ops), so the check runs sizes and batch sizes other than
the example's. Criteria: max |logit difference| <= `atol` (1e-4 by default, the tolerance optimum
uses for MobileViT-class models; fp32 graphs here differ by ~1e-6) and no changed argmax except at
pixels whose reference top-2 margin is within 2 x `atol` (a tie at float precision, which no
tolerance can order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from trustseg.export.runtime import run_session

DEFAULT_ATOL = 1e-4


def parity_shapes(divisor: int) -> list[tuple[int, int, int, int]]:
    """Two (B, 3, H, W) test shapes unlike the export example (B 2): B 1 on a square multiple of the
    divisor (no padding; the native APE grid of the tiny test models), and B 3 on a size that pads."""
    d = max(divisor, 4)
    return [(1, 3, 4 * d, 4 * d), (3, 3, 2 * d + 3, 5 * d + 1)]


def random_images(shapes: Iterable[Sequence[int]], seed: int = 0) -> list[torch.Tensor]:
    """Uniform raw images in [0, 255], one tensor per shape, from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=generator) * 255 for shape in shapes]


def compare(reference: torch.Tensor, candidate: torch.Tensor, atol: float = DEFAULT_ATOL) -> dict[str, Any]:
    """Agreement of two logit maps (B, K, H, W): max |difference|, argmax agreement, flips beyond ties."""
    if reference.shape != candidate.shape:
        return {"shape": list(reference.shape), "candidate_shape": list(candidate.shape), "ok": False}
    reference, candidate = reference.double(), candidate.double()
    diff = float((reference - candidate).abs().max())
    changed = reference.argmax(1) != candidate.argmax(1)
    if reference.shape[1] > 1:
        top2 = reference.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = torch.full_like(reference[:, 0], float("inf"))
    flips = int((changed & (margin > 2 * atol)).sum())
    return {
        "shape": list(reference.shape),
        "max_abs_diff": diff,
        "argmax_agreement": 1.0 - float(changed.double().mean()),
        "argmax_flips_beyond_tolerance": flips,
        "ok": diff <= atol and flips == 0,
    }


@torch.inference_mode()
def check_parity(module: nn.Module, session: Any, images: Iterable[torch.Tensor], *,
                 device: torch.device | str = "cpu", atol: float = DEFAULT_ATOL) -> list[dict[str, Any]]:
    """`compare` the torch `module` (on `device`) and the onnxruntime `session` on each batch of raw images."""
    checks = []
    with full_fp32():
        for batch in images:
            batch = batch.to(device)
            checks.append(compare(module(batch).float().cpu(), run_session(session, batch).cpu(), atol))
    return checks


@contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions (cuDNN allows it by default), as in the graph's session."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
