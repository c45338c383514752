"""Trust under shift on CamVid: test-time adaptation (TENT, reliable-pixel, uncertain-pixel) and
training-free refinement against the source model, and calibrators fitted on clean vs corrupted data,
under natural shift (a held-out sequence) and under the 15 common corruptions, through the trustseg
commands a user would run.

    python benchmarks/shift_camvid.py --camvid ../shared/data/camvid --out runs/shift_camvid

1. Per model (U-Net and SegFormer-B0, configs/camvid_*.yaml, from scratch for --train-minutes) trained on
   CamVid train **without sequence 0006R0** (train images 0:62 and 163:), which is held out.
2. `trustseg adapt --method norm,tent,reliable,uncertain --refine --bf16` with the final weights (last.pt:
   nothing is selected on the evaluation data), online, on CamVid val and on 0006R0, every --every-th
   frame, clean and under the corruptions at the severities: every pass sees the same corrupted images.
3. `trustseg robustness --refine --refine-guide image|features|both` on 0006R0, clean and under one
   corruption per family: refinement guided by the colours, by the model's features, or by both.
4. `trustseg calibrate --leave-one-family-out`: calibrators fitted on val (clean, and under the other
   families' corruptions at severities 1-5) and scored on 0006R0 under each held-out family.
5. The adaptation learning rate: tent, reliable and uncertain at lr 1e-4, 1e-3 and 1e-2 on 13 frames of
   sequence 0001TP (train images 0:62:5, seen in training, never reported), clean and under one
   corruption per family; the lr with the best mean mIoU over the three methods is then run on val and
   0006R0 as in step 2.

Every step skips what its output folder already holds and resumes what it interrupted (adapt also adds
severities given later). Prints Markdown
tables (mIoU and ECE per corruption family and pass; ECE clean-fitted vs corruption-fitted) and writes
every number to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from camvid_runs import evaluation_specs, folder_name, train_without_held_out, trustseg

RECIPES = {"unet": "configs/camvid_unet.yaml", "segformer": "configs/camvid_segformer_b0.yaml"}
GUIDES = ("image", "features", "both")
ONE_PER_FAMILY = "gaussian_noise,defocus_blur,fog,jpeg_compression"
LEARNING_METHODS = "tent,reliable,uncertain"
TUNING_LRS = ("1e-4", "1e-3", "1e-2")


def run(folder: Path, done: str | None, *args: str) -> None:
    """`trustseg *args --out folder` unless `folder/done` exists; resumed when the folder was started (a
    finished adapt run, `done` None, resumes too: it skips its finished passes and adds new severities)."""
    if done is None or not (folder / done).is_file():
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
    parser.add_argument("--methods", default="norm,tent,reliable,uncertain")
    parser.add_argument("--calibrators", default="ts,lts,ccaffine")
    parser.add_argument("--steps", default="train,adapt,refine,calibrate,tune", help="which steps to run")
    args = parser.parse_args()
    out, camvid, steps = args.out, args.camvid, args.steps.split(",")
    evaluations = evaluation_specs(camvid, args.every)
    val, held_out = evaluations.values()
    grid = ["--corruptions", args.corruptions, "--severities", args.severities]
    severity = args.severities.split(",")[-1]

    summary_path = out / "summary.json"
    summary: dict = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for model in args.models.split(","):
        folder = out / model
        if "train" in steps:
            run(folder, "metrics.json", "train", "--config", RECIPES[model], "--data", train_without_held_out(camvid),
                "--set", f"data.val=camvid:{camvid}#split=val", "--set", f"time_budget_min={args.train_minutes}",
                "--set", "report=false")
        checkpoint = str(folder / "last.pt")
        summary.setdefault(model, {})
        if "adapt" in steps:
            for where, spec in evaluations.items():
                adapted = out / "adapt" / f"{model}-{folder_name(where)}"
                run(adapted, None, "adapt", "--checkpoint", checkpoint, "--data", spec,
                    "--method", args.methods, "--refine", "--bf16", *grid, "--no-report")
                summary[model][where] = json.loads((adapted / "adapt.json").read_text())["summary"]
        if "refine" in steps:
            for guide in GUIDES:
                refined = out / "refine" / f"{model}-{guide}"
                run(refined, "robustness.json", "robustness", "--checkpoint", checkpoint, "--data", held_out,
                    "--refine", "--refine-guide", guide, "--corruptions", ONE_PER_FAMILY, "--severities", severity,
                    "--bf16", "--boundary-iou", "--no-image-quality", "--no-report")
                conditions = json.loads((refined / "robustness.json").read_text())["conditions"]
                summary[model].setdefault("refine", {})[guide] = {k: slim(v) for k, v in conditions.items()}
            source = out / "adapt" / f"{model}-heldout" / "adapt.json"  # the same images, unrefined
            if source.is_file():
                conditions = json.loads(source.read_text())["conditions"]
                summary[model]["refine"]["none"] = {k: slim(conditions[k]["source"])
                                                    for k in summary[model]["refine"]["image"] if k in conditions}
        if "calibrate" in steps:
            calibrated = out / "calibrate" / model
            run(calibrated, "calibration.json", "calibrate", "--checkpoint", checkpoint, "--fit-data", val, "--data",
                held_out, "--method", args.calibrators, *grid, "--leave-one-family-out", "--fit-corruptions",
                args.corruptions, "--fit-severities", "1-5", "--max-pixels", "200000", "--save", "none", "--no-report")
            summary[model]["calibration"] = json.loads((calibrated / "calibration.json").read_text())
        if "tune" in steps:
            tuning = {}
            for lr in TUNING_LRS:
                tuned = out / "tune" / f"{model}-lr{lr}"
                run(tuned, None, "adapt", "--checkpoint", checkpoint, "--data",
                    f"camvid:{camvid}#split=train,images=0:62:5", "--method", LEARNING_METHODS, "--lr", lr, "--bf16",
                    "--corruptions", ONE_PER_FAMILY, "--severities", severity, "--no-report")
                passes = json.loads((tuned / "adapt.json").read_text())["summary"]
                tuning[lr] = sum(passes[m]["mean_mIoU"] for m in LEARNING_METHODS.split(",")) / 3
            summary[model]["tuning"] = tuning
            best = max(tuning, key=tuning.get)
            for where, spec in evaluations.items() if best != "1e-4" else ():  # 1e-4, the default, is step 2
                adapted = out / "adapt" / f"{model}-{folder_name(where)}-lr{best}"
                run(adapted, None, "adapt", "--checkpoint", checkpoint, "--data", spec, "--method", LEARNING_METHODS,
                    "--lr", best, "--bf16", *grid, "--no-report")
                summary[model][f"{where}, lr {best}"] = json.loads((adapted / "adapt.json").read_text())["summary"]
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for model, results in summary.items():
        if "tuning" in results:
            print(f"\n{model}: mean mIoU (%) of tent, reliable and uncertain on 0001TP by lr: "
                  + ", ".join(f"{lr}: {100 * v:.2f}" for lr, v in results["tuning"].items()))
        for where, passes in results.items():
            if where.split(",")[0] in evaluations:
                table(f"{model}, {where}: mIoU and ECE (%) per corruption family", *adaptation_rows(passes))
        if "refine" in results:
            table(f"{model}, held out: refinement by guide (%)", *refinement_rows(results["refine"]))
        if "calibration" in results:
            table(f"{model}, held out: ECE (%) fitted on clean val vs on val under the other families",
                  *calibration_rows(results["calibration"]))


def slim(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("mIoU", "mBIoU", "ECE", "refine_ms_per_image")}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def cell(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def adaptation_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per pass: clean, per family and mean corrupted mIoU, the gain over the source, ECE likewise."""
    passes = [name for name, value in summary.items() if isinstance(value, dict) and "clean_mIoU" in value]
    families = list(summary[passes[0]]["per_family_mIoU"])
    header = ["pass", "clean mIoU", *families, "corrupted mIoU", "gain", "mean ECE", *(f"{f} ECE" for f in families)]
    rows = []
    for name in passes:
        r = summary[name]
        values = [r["clean_mIoU"], *(r["per_family_mIoU"][f] for f in families), r["mean_corrupted_mIoU"],
                  summary["mIoU_gain"].get(name), r["mean_ECE"], *(r["per_family_ECE"][f] for f in families)]
        rows.append([name, *map(cell, values)])
    return header, rows


def refinement_rows(by_guide: dict) -> tuple[list[str], list[list[str]]]:
    """Per condition and guide ("none": the unrefined source pass of adapt on the same images): mIoU and
    Boundary IoU, and the refinement's cost."""
    guides = sorted(by_guide, key=lambda g: g != "none")
    header = ["condition", *(f"{g} {m}" for g in guides for m in ("mIoU", "BIoU")),
              *(f"{g} ms/image" for g in guides if g != "none")]
    rows = [[key, *(cell(by_guide[g].get(key, {}).get(m)) for g in guides for m in ("mIoU", "mBIoU")),
             *(f"{by_guide[g][key]['refine_ms_per_image']:.0f}" for g in guides if g != "none")]
            for key in by_guide["image"]]
    return header, rows


def calibration_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per held-out condition and method: ECE fitted on clean images, fitted under the other families."""
    header = ["condition", "method", "clean-fitted", "fitted w/o family", "Δ (pp)"]
    rows = []
    for held_out in (results["leave_one_family_out"] or {}).values():
        for key, by_method in held_out["conditions"].items():
            for method, shifted in by_method.items():
                clean = results["conditions"][key][method]["ECE"]
                rows.append([key, method, cell(clean), cell(shifted["ECE"]), f"{100 * (shifted['ECE'] - clean):+.2f}"])
    return header, rows


if __name__ == "__main__":
    main()
