"""Peak memory of `trustseg eval` and `trustseg robustness` does not grow with the number of images.

Each command runs in fresh processes on the first 10 and on all 60 images of one dataset; the two
peak resident set sizes must agree to within a quarter of what keeping the 50 extra images' logits
would add. Full-size figures (2048x1024, SegFormer-B0): ``benchmarks/memory.py`` and RESULTS.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import trustseg
from cli_helpers import folder_tree, save_tiny_unet
from trustseg.bench.memory import wait_peak_rss
from trustseg.data.classes import generic_classes

CLASSES = generic_classes(f"class{k}" for k in range(19))
SIZE = 256
FEW, MANY = 10, 60
# float32 logits (1, K, H, W) of one image: what an evaluation that kept its outputs would add per image
LOGITS_BYTES = CLASSES.num_classes * SIZE * SIZE * 4
TOLERANCE = (MANY - FEW) * LOGITS_BYTES // 4


@pytest.fixture(scope="module")
def data_and_checkpoint(tmp_path_factory):
    root = folder_tree(tmp_path_factory.mktemp("memory") / "data", CLASSES)
    rng = np.random.default_rng(0)
    for i in range(MANY):
        # 32x32 blocks: labels of every class plus ignored blocks, cheap to write and to decode
        labels = rng.integers(0, CLASSES.num_classes, (8, 8)).astype(np.uint8)
        labels[rng.random((8, 8)) < 0.1] = 255
        colours = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        up = lambda a: a.repeat(SIZE // 8, 0).repeat(SIZE // 8, 1)  # noqa: E731
        Image.fromarray(up(colours), "RGB").save(root / "images" / f"{i:03d}.png")
        Image.fromarray(up(labels), "L").save(root / "masks" / f"{i:03d}.png")
    checkpoint = root.parent / "unet.pt"
    save_tiny_unet(checkpoint, CLASSES)
    return root, checkpoint


def start(command: list[str], images: int, out: Path) -> subprocess.Popen:
    """`trustseg *command` on the first `images` images, writing to `out` (its output in `out`.log)."""
    # the child imports this trustseg, single-threaded so that the runs share the cores evenly
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(trustseg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", "trustseg.cli", *command, "--max-images", str(images),
                                 "--out", str(out), "--device", "cpu", "--no-progress"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("command", ["eval", "robustness"])
def test_peak_rss_does_not_grow_with_the_number_of_images(tmp_path, data_and_checkpoint, command):
    root, checkpoint = data_and_checkpoint
    args = [command, "--checkpoint", str(checkpoint), "--data", f"folder:{root}"]
    if command == "robustness":
        args += ["--corruptions", "gaussian_noise", "--severities", "3"]
    processes = {n: start(args, n, tmp_path / str(n)) for n in (FEW, MANY)}  # side by side: half the wall time
    peaks = {}
    for n, process in processes.items():
        peaks[n] = wait_peak_rss(process)
        assert process.returncode == 0, (tmp_path / f"{n}.log").read_text()[-3000:]
    growth = peaks[MANY] - peaks[FEW]
    assert growth <= TOLERANCE, (
        f"{command}: peak RSS {peaks[FEW] / 2**20:.0f} MiB on {FEW} images but {peaks[MANY] / 2**20:.0f} MiB on "
        f"{MANY}; +{growth / 2**20:.0f} MiB exceeds {TOLERANCE / 2**20:.0f} MiB, a quarter of keeping "
        f"{MANY - FEW} images' logits")
