"""Confusion-matrix kernels on one 512x1024, 19-class stream, interleaved: which formulation is fastest?

    python benchmarks/confusion_variants.py [--threads N] [--rounds R]

(a) CPU.md's baseline: route ignore pixels to an extra bin with `where`, then bincount.
(b) ours: one fused `p + K*t` (torch.add with alpha) and a bincount with a row per target label up
    to 255, so ignore pixels need no `where` (their row is dropped afterwards).
(c) ConfusionMatrix.update on hard predictions: (b) plus every check (shapes, dtypes, pred range,
    target labels via one aminmax and the spilled rows).
(d) (b) with numpy.bincount.
(e) (b) with an int32 index: half the bytes for bincount to read, but a narrowing write.
(a), (b), (d), (e) are bare kernels without input checks, so they compare like with like.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from trustseg.bench.metrics import make_pool
from trustseg.metrics.confusion import ConfusionMatrix

K, IGNORE = 19, 255


def where_bincount(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    index = torch.where(target == IGNORE, K * K, target * K + pred)
    return torch.bincount(index.flatten(), minlength=K * K + 1)[: K * K].view(K, K)


def fused_bincount(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    index = torch.add(pred, target, alpha=K)
    return torch.bincount(index.flatten(), minlength=(IGNORE + 1) * K)[: K * K].view(K, K)


def numpy_bincount(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    index = torch.add(pred, target, alpha=K).flatten().numpy()
    return np.bincount(index, minlength=(IGNORE + 1) * K)[: K * K].reshape(K, K)


def int32_index_bincount(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    index = torch.empty(target.shape, dtype=torch.int32)
    torch.add(pred, target, alpha=K, out=index)
    return torch.bincount(index.flatten(), minlength=(IGNORE + 1) * K)[: K * K].view(K, K)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pred, target = make_pool(4, 512, 1024, K, 0.1, seed=0)
    expected = where_bincount(pred, target)
    accumulator = ConfusionMatrix(K)
    accumulator.update(pred, target)
    assert torch.equal(accumulator.matrix, expected)
    variants = {
        "(a) where + bincount (CPU.md)": where_bincount,
        "(b) fused add + bincount with label rows": fused_bincount,
        "(c) ConfusionMatrix.update (hard preds)": accumulator.update,
        "(d) numpy.bincount of the fused index": numpy_bincount,
        "(e) (b) with an int32 index": int32_index_bincount,
    }
    assert torch.equal(fused_bincount(pred, target), expected)
    assert torch.equal(int32_index_bincount(pred, target), expected)
    assert np.array_equal(numpy_bincount(pred, target), expected.numpy())
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        i = r % len(pred)
        p, t = pred[i : i + 1], target[i : i + 1]
        names = list(variants)
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name](p, t)
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':42}{'median ms':>10}{'best ms':>9}")
    for name, ts in times.items():
        print(f"{name:42}{statistics.median(ts):>10.3f}{min(ts):>9.3f}")


if __name__ == "__main__":
    main()
