"""Peak resident memory of `trustseg eval` and `trustseg robustness` on Cityscapes-sized images.

Writes a synthetic ``folder:`` dataset (2048x1024 RGB PNGs of random coloured blocks, 19-class masks
with 10 % of the blocks ignored) and a SegFormer-B0 checkpoint with random weights and 19 classes
into a temporary folder. Then runs the real CLI once per measurement, each in a fresh process:

    trustseg eval --checkpoint C --data folder:D --max-images N --device cpu --no-progress --out O
    trustseg robustness ... --corruptions gaussian_noise --severities 3   (clean pass + one corrupted pass)

with the commands' default metrics, batch 1. For each process it reports the peak resident set size
(``ru_maxrss`` of that child alone: `trustseg.bench.memory.wait_peak_rss`) and the wall time.
Streaming evaluation keeps sums, not per-image outputs, so the peak should not depend on N; the row
``python -c "import torch"`` gives the interpreter's own floor. Run from the repository root:

    PYTHONPATH=src python benchmarks/memory.py                      # N = 10 and 100, 2048x1024
    PYTHONPATH=src python benchmarks/memory.py --images 2,4 --width 512 --height 256   # a quick look

The images are generated once (for the largest N); smaller N use ``--max-images``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import trustseg
from trustseg.bench.machine import machine_info
from trustseg.bench.memory import wait_peak_rss
from trustseg.data.classes import generic_classes
from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.models.factory import build_model

BLOCK = 64  # side of the constant-colour blocks: PNGs stay small and cheap to decode


def write_dataset(root: Path, count: int, height: int, width: int, num_classes: int, seed: int = 0) -> str:
    """A ``folder:`` dataset of `count` images at `root`; returns its data spec."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(num_classes)))
    rng = np.random.default_rng(seed)
    grid = (-(-height // BLOCK), -(-width // BLOCK))
    for i in range(count):
        labels = rng.integers(0, num_classes, grid).astype(np.uint8)
        colours = rng.integers(0, 256, (*grid, 3), dtype=np.uint8)
        labels[rng.random(grid) < 0.1] = 255
        up = lambda a: a.repeat(BLOCK, 0).repeat(BLOCK, 1)[:height, :width]  # noqa: E731
        Image.fromarray(up(colours), "RGB").save(root / "images" / f"{i:04d}.png", compress_level=1)
        Image.fromarray(up(labels), "L").save(root / "masks" / f"{i:04d}.png", compress_level=1)
    return f"folder:{root}"


def write_checkpoint(path: Path, name: str, options: dict, num_classes: int, seed: int = 0) -> None:
    """A checkpoint of model `name` with random weights (seeded) and `num_classes` generic classes."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, **options)
    classes = generic_classes(f"class{k}" for k in range(num_classes))
    save_checkpoint(Checkpoint({"name": name, "options": options}, model.state_dict(), classes), path)


def run_measured(argv: list[str], log: Path) -> tuple[float, float]:
    """Run `argv` in a fresh process; return (its peak RSS in MiB, wall seconds). Raises if it fails."""
    # the children import the trustseg this script imported, whatever the installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(trustseg.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = wait_peak_rss(process)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}; see {log}:\n"
                           + log.read_text()[-3000:])
    return peak / 2**20, seconds


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="10,100", help="comma-separated numbers of images")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--variant", default="b0", help="SegFormer variant")
    parser.add_argument("--commands", default="eval,robustness")
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severity", default="3")
    parser.add_argument("--workdir", help="keep the data, checkpoint and runs here (default: a temporary folder)")
    args = parser.parse_args()
    counts = [int(n) for n in args.images.split(",")]
    commands = args.commands.split(",")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        data = write_dataset(work / "data", max(counts), args.height, args.width, args.classes)
        checkpoint = work / "segformer.pt"
        write_checkpoint(checkpoint, "segformer", {"variant": args.variant}, args.classes)
        info = machine_info()
        print(f"{max(counts)} images {args.width}x{args.height}, {args.classes} classes, "
              f"SegFormer-{args.variant.upper()} (random weights), batch 1, cpu; "
              f"written in {time.perf_counter() - start:.0f} s")
        print(f"{info['cpu']}, torch {info['torch']}, {info['threads']} threads, {info['date']}", flush=True)

        cli = [sys.executable, "-m", "trustseg.cli"]
        extra = {"eval": [], "robustness": ["--corruptions", args.corruption, "--severities", args.severity]}
        runs = [("python -c \"import torch\"", None, [sys.executable, "-c", "import torch"])]
        for command in commands:
            for n in counts:
                out = work / f"{command}_{n}"
                runs.append((f"`{command}`", n, [*cli, command, "--checkpoint", str(checkpoint), "--data", data,
                                                 "--max-images", str(n), "--out", str(out), "--device", "cpu",
                                                 "--no-progress", *extra[command]]))
        print("\n| command | images | peak RSS MiB | wall s | s per image | load avg before / after |")
        print("|---|---|---|---|---|---|", flush=True)
        for label, n, argv in runs:
            before = load_average()
            peak, seconds = run_measured(argv, work / f"log_{label.strip('`').split()[0]}_{n}.txt")
            per_image = f"{seconds / n:.2f}" if n else ""
            print(f"| {label} | {n or ''} | {peak:.0f} | {seconds:.1f} | {per_image} | {before} / {load_average()} |",
                  flush=True)


if __name__ == "__main__":
    main()
