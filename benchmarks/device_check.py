"""The same commands on the CPU and on a GPU give the same results: demo training, eval, robustness and
calibrate, run through the public workflows on both devices and compared.

    PYTHONPATH=src python benchmarks/device_check.py --out runs/device_check [--steps 150] [--segformer-steps 20]
        [--device cuda]

Trains the demo recipe (shortened to --steps) on --device, then, on that one checkpoint, runs eval,
robustness under three corruptions and calibrate (temperature scaling and LTS) once on the CPU and once
on --device, and prints every compared value side by side. Tolerances (the project's contract): mIoU
within 0.1 point, ECE and the other histogram metrics within 1e-3 (bf16 is off, so the two devices
differ only by float rounding in convolutions and reductions). Exits non-zero when a value is outside
its tolerance. Also prints training throughput on each device (median img/s of the logged windows):
the demo recipe (--steps) and SegFormer-B0 at 512x512, batch 8, fp32 (--segformer-steps).

With --device cpu both sides run on the CPU: a smoke test of this script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from trustseg.engine.devices import describe_device, resolve_device
from trustseg.training.config import load_train_config
from trustseg.training.history import read_history
from trustseg.training.loop import BEST, train
from trustseg.workflows.calibration import CalibrateConfig, run_calibrate
from trustseg.workflows.demo import DEMO_RECIPE
from trustseg.workflows.evaluation import EvalConfig, run_eval
from trustseg.workflows.robustness import RobustnessConfig, run_robustness

CORRUPTIONS = ("gaussian_noise", "motion_blur", "fog")
MIOU_POINTS = 0.1  # percentage points
HISTOGRAM = 1e-3  # ECE, NLL, AUROC: fractions


# SegFormer-B0 in the demo recipe's place: 512x512 crops of 512x512 synthetic scenes, batch 8
SEGFORMER_B0 = ["model.name=segformer", "model.options={variant: b0}", "data.train=synthetic#cache=true,size=512",
                "data.crop=[512,512]", "batch_size=8", "data.val_batch_size=8"]


def trained(out: Path, device: str, steps: int, changes: list[str] = ()) -> tuple[Path, float]:
    """Train the demo recipe with `changes` for `steps` on `device` (bf16 off, so devices compare);
    (best.pt, median img/s of the logged training windows)."""
    config = load_train_config(DEMO_RECIPE, [f"out={out}", f"device={device}", f"steps={steps}", "bf16=false",
                                             f"val_every={steps}", "log_every=5", *changes])
    train(config, progress=False)
    rates = sorted(r["img_per_s"] for r in read_history(out) if r["kind"] == "train")
    return out / BEST, rates[len(rates) // 2]


def compared(rows: list[tuple[str, float, float, float]]) -> int:
    """Print `name cpu device |diff| tolerance` rows; the number of rows outside their tolerance."""
    failures = 0
    print(f"{'value':44s} {'cpu':>12s} {'device':>12s} {'|diff|':>10s}  ok")
    for name, cpu, other, tolerance in rows:
        diff = abs(cpu - other) if not (math.isnan(cpu) and math.isnan(other)) else 0.0
        ok = diff <= tolerance
        failures += not ok
        print(f"{name:44s} {cpu:12.6f} {other:12.6f} {diff:10.2e}  {'yes' if ok else 'NO'}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/device_check"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--segformer-steps", type=int, default=20, help="SegFormer-B0 training steps timed per device")
    args = parser.parse_args()
    device = str(resolve_device(args.device))
    print(f"torch {torch.__version__} on {describe_device(torch.device(device))}")
    sides = {"cpu": "cpu", "device": device}  # role -> device; both roles run even when --device is cpu
    demo = {role: trained(args.out / f"train_{role}", side, args.steps) for role, side in sides.items()}
    segformer = {role: trained(args.out / f"segformer_{role}", side, args.segformer_steps, SEGFORMER_B0)[1]
                 for role, side in sides.items()}
    for name, rates in (("demo", {role: rate for role, (_, rate) in demo.items()}),
                        ("SegFormer-B0 (512x512, batch 8, fp32)", segformer)):
        print(f"{name} training throughput: cpu {rates['cpu']:.2f} img/s, {device} {rates['device']:.2f} img/s "
              f"({rates['device'] / rates['cpu']:.1f}x)")

    checkpoint = demo["device"][0]  # one checkpoint, evaluated on both devices
    data = "synthetic#cache=true"
    results = {}
    for role, side in sides.items():
        results[role] = {
            "eval": run_eval(EvalConfig(checkpoint=str(checkpoint), data=data, split="val",
                                        out=str(args.out / f"eval_{role}"), device=side, progress=False)).metrics,
            "robustness": run_robustness(RobustnessConfig(
                checkpoint=str(checkpoint), data=data, out=str(args.out / f"robustness_{role}"), corruptions=CORRUPTIONS,
                severities=(3,), device=side, progress=False)).conditions,
            "calibrate": run_calibrate(CalibrateConfig(
                checkpoint=str(checkpoint), fit_data="synthetic#split=val,images=0:32", data="synthetic#split=val,images=32:",
                out=str(args.out / f"calibrate_{role}"), methods=("ts", "lts"), epochs=5, save="none", device=side,
                progress=False)).conditions,
        }
    cpu, other = results["cpu"], results["device"]
    rows: list[tuple[str, float, float, float]] = []
    for key, tolerance in (("mIoU", MIOU_POINTS / 100), ("mIoU_img", MIOU_POINTS / 100), ("ECE", HISTOGRAM),
                           ("NLL", HISTOGRAM), ("AUROC_msp", HISTOGRAM)):
        rows.append((f"eval {key}", cpu["eval"][key], other["eval"][key], tolerance))
    for key in cpu["robustness"]:
        for metric, tolerance in (("mIoU", MIOU_POINTS / 100), ("ECE", HISTOGRAM)):
            rows.append((f"robustness {key} {metric}", cpu["robustness"][key][metric],
                         other["robustness"][key][metric], tolerance))
    for key in cpu["calibrate"]:
        for method in cpu["calibrate"][key]:
            rows.append((f"calibrate {key} {method} ECE", cpu["calibrate"][key][method]["ECE"],
                         other["calibrate"][key][method]["ECE"], HISTOGRAM))
    failures = compared(rows)
    if failures:
        raise SystemExit(f"{failures} value(s) differ between cpu and {device} beyond their tolerance")


if __name__ == "__main__":
    main()
