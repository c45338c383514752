"""Segmenter.forward: upsample the head's logits as they come (a channels-last view) or `.contiguous()` first?

    python benchmarks/contiguous_upsample.py [--model vit_s16] [--size 512] [--rounds 15] [--threads N]
    python benchmarks/contiguous_upsample.py --upsample-only [--threads N]

`LinearHead` returns (B, K, h, w) logits as a transposed view with channels-last strides, and
`F.interpolate` then works, and writes its (B, K, H, W) output, in that layout. Variant (a) is the
forward as written in `Segmenter`; (b) copies the small logit map to contiguous before upsampling.
Both run on the same weights and input, alternating within every round (the first of the pair
alternates too), fp32 and bf16 autocast, under `torch.inference_mode()`; the first 3 rounds are
dropped. Prints ms per forward (median / best) and the speed-up of (b) over (a), median by median and
best by best, plus the output difference. Random weights, 19 classes (as `trustseg bench model`).
`--upsample-only` times just the step that differs: (1, 19, 32, 32) logits (ViT-S/16 at 512²) from
the head's view, or copied first, upsampled to 512², in fp32 and in bf16 (40 rounds after 10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from trustseg.bench.model import build_bench_model


def forward(model: torch.nn.Module, images: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """`Segmenter.forward`, with or without the copy before the upsampling."""
    tokens, grid, layers = model.backbone.forward_features(images, return_layers=model.head.layers)
    logits = model.head(tokens, grid, layers)
    if contiguous:
        logits = logits.contiguous()
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def upsample_only(size: int, rounds: int = 40, warmup: int = 10) -> None:
    grid = size // 16
    for dtype in (torch.float32, torch.bfloat16):
        tokens = torch.randn(1, grid * grid, 19).to(dtype)
        view = tokens.transpose(1, 2).reshape(1, 19, grid, grid)  # as LinearHead returns it
        times: dict[str, list[float]] = {"as is": [], "contiguous": []}
        for round_ in range(warmup + rounds):
            for variant in (list(times) if round_ % 2 == 0 else list(times)[::-1]):
                start = time.perf_counter()
                x = view.contiguous() if variant == "contiguous" else view
                F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                if round_ >= warmup:
                    times[variant].append((time.perf_counter() - start) * 1e3)
        a, b = times["as is"], times["contiguous"]
        print(f"upsample {dtype}: as is {statistics.median(a):.2f} / {min(a):.2f} ms, contiguous "
              f"{statistics.median(b):.2f} / {min(b):.2f} ms, speed-up {statistics.median(a) / statistics.median(b):.2f}x, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_s16")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--upsample-only", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.upsample_only:
        return upsample_only(args.size)
    torch.manual_seed(0)
    model = build_bench_model(args.model)
    images = torch.randn(1, 3, args.size, args.size)
    variants = {"as is": False, "contiguous": True}
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    times: dict[tuple[str, str], list[float]] = {(d, v): [] for d in dtypes for v in variants}
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.rounds):
            for dtype_name, dtype in dtypes.items():
                order = list(variants) if round_ % 2 == 0 else list(variants)[::-1]
                for variant in order:
                    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                        start = time.perf_counter()
                        out = forward(model, images, variants[variant])
                        elapsed = time.perf_counter() - start
                    if round_ >= args.warmup:
                        times[(dtype_name, variant)].append(elapsed * 1e3)
                    outputs[(dtype_name, variant)] = out.float()
    print(f"{args.model} {args.size}x{args.size}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    for dtype_name in dtypes:
        a, b = times[(dtype_name, "as is")], times[(dtype_name, "contiguous")]
        out_a, out_b = outputs[(dtype_name, "as is")], outputs[(dtype_name, "contiguous")]
        diff = (out_a - out_b).abs().max().item()
        same = bool((out_a.argmax(1) == out_b.argmax(1)).all())
        print(f"{dtype_name}: as is {statistics.median(a):.1f} / {min(a):.1f} ms, "
              f"contiguous {statistics.median(b):.1f} / {min(b):.1f} ms, "
              f"speed-up {statistics.median(a) / statistics.median(b):.3f}x / {min(a) / min(b):.3f}x, "
              f"max abs diff {diff:.2g}, argmax identical: {same}")


if __name__ == "__main__":
    main()
