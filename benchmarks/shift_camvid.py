"""Trust under shift on CamVid: test-time adaptation (TENT, reliable-pixel, uncertain-pixel) and
training-free refinement against the source model, and calibrators fitted on clean vs corrupted data,
under natural shift (a held-out sequence) and under the 15 common corruptions, through the trustseg
commands a user would run.

    python benchmarks/shift_camvid.py --camvid ../shared/data/camvid --out runs/shift_camvid

1. Per model (U-Net and SegFormer-B0, configs/camvid_*.yaml, from scratch for --train-minutes) trained on
   CamVid train **without sequence 0006R0** (train images 0:62 and 163:), which is held out.
2. `trustseg adapt --method tent,reliable,uncertain --refine` with the final weights (last.pt: nothing
   is selected on the evaluation data), online, on CamVid val and on 0006R0, every --every-th frame,
   clean and under the corruptions at the severities: every pass sees the same corrupted images.
3. `trustseg calibrate --leave-one-family-out`: calibrators fitted on val (clean, and under the other
   families' corruptions at severities 1-5) and scored on 0006R0 under each held-out family.

Every step skips what its output folder already holds and resumes what it interrupted. Prints Markdown
tables (mIoU and ECE per corruption family and pass; ECE clean-fitted vs corruption-fitted) and writes
every number to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from camvid_runs import evaluation_specs, train_without_held_out, trustseg

RECIPES = {"unet": "configs/camvid_unet.yaml", "segformer": "configs/camvid_segformer_b0.yaml"}
PASS_COLUMNS = ("clean_mIoU", "mean_corrupted_mIoU")


def run(folder: Path, done: str, *args: str) -> None:
    """`trustseg *args --out folder` unless `folder/done` exists; resumed when the folder was started."""
    if not (folder / done).is_file():
        trustseg(*args, "--out", str(folder), *(["--resume"] if folder.exists() else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camvid", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="unet,segformer")
    parser.add_argument("--train-minutes", type=int, default=40)
    parser.add_argument("--every", type=int, default=4, help="evaluate every N-th frame of each sequence")
    parser.add_argument("--corruptions", default="common")
    parser.add_argument("--severities", default="3,5")
    parser.add_argument("--methods", default="tent,reliable,uncertain")
    parser.add_argument("--calibrators", default="ts,lts,ccaffine")
    parser.add_argument("--steps", default="train,adapt,calibrate", help="which steps to run")
    args = parser.parse_args()
    out, camvid, steps = args.out, args.camvid, args.steps.split(",")
    evaluations = evaluation_specs(camvid, args.every)
    val, held_out = evaluations.values()
    grid = ["--corruptions", args.corruptions, "--severities", args.severities]

    summary: dict = {}
    for model in args.models.split(","):
        folder = out / model
        if "train" in steps:
            run(folder, "metrics.json", "train", "--config", RECIPES[model], "--data", train_without_held_out(camvid),
                "--set", f"data.val=camvid:{camvid}#split=val", "--set", f"time_budget_min={args.train_minutes}",
                "--set", "report=false")
        checkpoint = str(folder / "last.pt")
        summary[model] = {}
        if "adapt" in steps:
            for where, spec in evaluations.items():
                adapted = out / "adapt" / f"{model}-{where.split()[0].replace('held', 'heldout')}"
                run(adapted, "adapt.json", "adapt", "--checkpoint", checkpoint, "--data", spec, "--method", args.methods,
                    "--refine", "--bf16", *grid, "--no-report")
                summary[model][where] = json.loads((adapted / "adapt.json").read_text())["summary"]
        if "calibrate" in steps:
            calibrated = out / "calibrate" / model
            run(calibrated, "calibration.json", "calibrate", "--checkpoint", checkpoint, "--fit-data", val, "--data",
                held_out, "--method", args.calibrators, *grid, "--leave-one-family-out", "--fit-corruptions",
                args.corruptions, "--fit-severities", "1-5", "--max-pixels", "200000", "--save", "none", "--no-report")
            summary[model]["calibration"] = json.loads((calibrated / "calibration.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_tables(summary)


def print_tables(summary: dict) -> None:
    """mIoU and ECE per pass and corruption family (one table per model and sequence)."""
    for model, by_where in summary.items():
        for where, results in by_where.items():
            if where == "calibration":
                continue
            passes = [p for p in results if isinstance(results[p], dict) and "clean_mIoU" in results[p]]
            families = list(results[passes[0]]["per_family_mIoU"])
            header = ["pass", "clean mIoU", *families, "corrupted mIoU", "gain", "mean ECE", *(f"{f} ECE" for f in families)]
            print(f"\n{model}, {where}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
            for name in passes:
                r = results[name]
                cells = [r["clean_mIoU"], *(r["per_family_mIoU"][f] for f in families), r["mean_corrupted_mIoU"]]
                gain = results["mIoU_gain"].get(name)
                cells += [gain, r["mean_ECE"], *(r["per_family_ECE"][f] for f in families)]
                print(f"| {name} | " + " | ".join("–" if c is None else f"{100 * c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
