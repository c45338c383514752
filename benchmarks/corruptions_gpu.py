"""The 19 corruptions on a GPU: agreement with the CPU, then speed against the reference ``imagecorruptions``.

    PYTHONPATH=src python benchmarks/corruptions_gpu.py                     # CUDA, 8 images of 512x1024
    PYTHONPATH=src python benchmarks/corruptions_gpu.py --device cpu --backend torch --size 64,96 --rounds 1

First, for every corruption, the first ``--check-images`` images are corrupted on ``--device`` and on the
CPU (OpenCV filters) with the same per-image generators; the two uint8 results must agree within one
level at no more than ``--max-flips`` of the values (float rounding: OpenCV filters in float32, the torch
backend in float64; tests/robustness/test_devices.py states the measured figures). Then
``trustseg.bench.corruptions.bench_corruptions`` times ours on the whole batch on ``--device`` (batch
already there, ``torch.cuda.synchronize`` around each call) against the reference on each image on the
CPU, and prints per-corruption ms per image, speed-ups and their geometric mean. Exits non-zero if an
agreement check fails. ``--device cpu --backend torch`` runs the GPU code path on the CPU, to check the
script where there is no GPU.
"""

from __future__ import annotations

import argparse

import torch

from trustseg.bench.corruptions import bench_corruptions, bench_images, format_corruptions_bench
from trustseg.engine.devices import describe_device, resolve_device
from trustseg.robustness.corruptions import CORRUPTIONS, corrupt, ops


def agreement(data: str, num_images: int, height: int, width: int, severity: int, device: str,
              backend: str | None) -> list[tuple[str, int, float]]:
    """(corruption, largest level difference, share of values that differ) of ``device`` against the CPU."""
    images = bench_images(data, num_images, height, width)
    rows = []
    for name in CORRUPTIONS:
        generators = [torch.Generator().manual_seed(i) for i in range(num_images)]
        want, _ = corrupt(images, name, severity, generators)
        generators = [torch.Generator().manual_seed(i) for i in range(num_images)]
        with ops.use_backend(backend):
            got, _ = corrupt(images.to(device), name, severity, generators)
        if got.device.type != torch.device(device).type:
            raise SystemExit(f"{name} returned a tensor on {got.device}, not on {device}")
        diff = (got.cpu().int() - want.int()).abs()
        rows.append((name, int(diff.max()), (diff > 0).float().mean().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", choices=ops.BACKENDS, default=None, help="filters; default: by device")
    parser.add_argument("--data", default="synthetic#split=val", help="a data spec, e.g. camvid:PATH#split=val")
    parser.add_argument("--size", default="512,1024", help="H,W")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--check-images", type=int, default=2)
    parser.add_argument("--max-flips", type=float, default=0.025, help="share of uint8 values allowed to differ by 1")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split(","))

    print(f"torch {torch.__version__}, ours on {describe_device(resolve_device(args.device))}, reference on the CPU")
    failed = []
    print(f"agreement with the CPU, {args.check_images} images, severity {args.severity}:")
    for name, largest, share in agreement(args.data, args.check_images, height, width, args.severity,
                                          args.device, args.backend):
        ok = largest <= 1 and share <= args.max_flips
        print(f"  {name:18s} max |diff| {largest} level(s), {share:.5f} of values differ{'' if ok else '  FAIL'}")
        if not ok:
            failed.append(name)

    result = bench_corruptions(data=args.data, num_images=args.batch, height=height, width=width,
                               severity=args.severity, rounds=args.rounds, device=args.device, backend=args.backend)
    print(format_corruptions_bench(result))
    if failed:
        raise SystemExit(f"{args.device} and the CPU disagree on: {', '.join(failed)}")


if __name__ == "__main__":
    main()
