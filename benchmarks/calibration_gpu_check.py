"""CalibrationHistogram's accelerator path (one step per image) against its CPU path, and its speed there.

    PYTHONPATH=src python benchmarks/calibration_gpu_check.py

Needs a CUDA device. Feeds the benchmark's pool of four 512x1024, 19-class logit maps through the full
and the top-label settings on both devices, prints the largest difference over every value, and the
full setting's ms per image on the GPU (10 passes after 3 warm-up passes). Exits non-zero if a value
differs by 1e-6 or more.
"""

import math
import time

import torch

from trustseg.bench.calibration import make_logits_pool
from trustseg.metrics import CalibrationHistogram

SETTINGS = ({}, {"classwise": False, "boundary_width": 0})


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0))
    logits, target = make_logits_pool(4, 512, 1024, 19, 0.1, 0)
    worst = 0.0
    for options in SETTINGS:
        cpu, gpu = CalibrationHistogram(19, **options), CalibrationHistogram(19, **options)
        for i in range(len(logits)):
            cpu.update(logits[i : i + 1], target[i : i + 1])
            gpu.update(logits[i : i + 1].cuda(), target[i : i + 1].cuda())
        on_cpu, on_gpu = cpu.compute(), gpu.compute()
        for key, value in on_cpu.items():
            if isinstance(value, float) and not math.isnan(value):
                worst = max(worst, abs(value - on_gpu[key]))
        print(options or "full set", "ECE", on_cpu["ECE"], on_gpu["ECE"], "largest |cpu - gpu| so far", worst)
    metric, images, labels = CalibrationHistogram(19), logits.cuda(), target.cuda()
    for _ in range(3):
        metric.update(images, labels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        metric.update(images, labels)
    torch.cuda.synchronize()
    print("full set on the GPU, ms per image", (time.perf_counter() - start) / (10 * len(logits)) * 1e3)
    if worst >= 1e-6:
        raise SystemExit(f"CPU and GPU differ by {worst}")


if __name__ == "__main__":
    main()
