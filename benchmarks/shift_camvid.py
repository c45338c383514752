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
   families' corruptions at severities 1-5) and scored on 0006R0 under each held-out family, one run per
   severity.
5. The adaptation learning rate: tent, reliable and uncertain at lr 1e-4, 1e-3 and 1e-2 on 13 frames of
   sequence 0001TP (train images 0:62:5, seen in training, never reported), clean and under one
   corruption per family; the lr with the best mean mIoU over the three methods is then run on val and
   0006R0 as in step 2.
6. The BatchNorm prior (`--bn-prior N`, source statistics counted as N images): norm at N = 0, 1, 4, 16, 64
   on the frames of step 5; the N with the best mean mIoU, if not 0, is run on val and 0006R0 with norm and
   tent (at the lr of step 5).

Every step skips what its output folder already holds and resumes what it interrupted (adapt also adds
severities given later). Prints Markdown
tables (per severity: mIoU and ECE per corruption family and pass; ECE clean-fitted vs corruption-fitted)
and writes the numbers they show to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from camvid_runs import evaluation_specs, folder_name, train_without_held_out, trustseg

from trustseg.workflows.adapt import family_means

RECIPES = {"unet": "configs/camvid_unet.yaml", "segformer": "configs/camvid_segformer_b0.yaml"}
GUIDES = ("image", "features", "both")
ONE_PER_FAMILY = "gaussian_noise,defocus_blur,fog,jpeg_compression"
LEARNING_METHODS = "tent,reliable,uncertain"
TUNING_LRS = ("1e-4", "1e-3", "1e-2")
PRIORS = ("0", "1", "4", "16", "64")  # BatchNorm prior strengths N, in images (0: the batch alone)


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
    parser.add_argument("--steps", default="train,adapt,refine,calibrate,tune,prior", help="which steps to run")
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
        adapted_runs = (out / "adapt" / model, evaluations, "--checkpoint", checkpoint, "--bf16", *grid)
        if "adapt" in steps:
            summary[model].update(adapt_each(*adapted_runs, "--method", args.methods, "--refine"))
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
            for level in args.severities.split(","):  # one folder per severity: a severity added later runs alone
                calibrated = out / "calibrate" / f"{model}-severity{level}"
                run(calibrated, "calibration.json", "calibrate", "--checkpoint", checkpoint, "--fit-data", val,
                    "--data", held_out, "--method", args.calibrators, "--corruptions", args.corruptions,
                    "--severities", level, "--leave-one-family-out", "--fit-corruptions", args.corruptions,
                    "--fit-severities", "1-5", "--max-pixels", "200000", "--save", "none", "--no-report")
                summary[model].setdefault("calibration", {})[level] = json.loads(
                    (calibrated / "calibration.json").read_text())
        tuning_run = ("--checkpoint", checkpoint, "--data", f"camvid:{camvid}#split=train,images=0:62:5", "--bf16",
                      "--corruptions", ONE_PER_FAMILY, "--severities", severity)
        if "tune" in steps:
            tuning = choose(out / "tune" / f"{model}-lr", "--lr", TUNING_LRS, LEARNING_METHODS.split(","), *tuning_run,
                            "--method", LEARNING_METHODS)
            summary[model]["tuning"] = tuning
            best = highest(tuning)
            if best != "1e-4":  # 1e-4, the default, is step 2
                runs = adapt_each(*adapted_runs, "--method", LEARNING_METHODS, "--lr", best, suffix=f"-lr{best}")
                summary[model].update({f"{where}, lr {best}": result for where, result in runs.items()})
        if "prior" in steps:
            tuning = choose(out / "tune" / f"{model}-prior", "--bn-prior", PRIORS, ["norm"], *tuning_run,
                            "--method", "norm")
            summary[model]["prior_tuning"] = tuning
            best, lr = highest(tuning), highest(summary[model].get("tuning", {"1e-4": 0}))
            if best != "0":  # 0: norm in step 2, tent in step 5
                runs = adapt_each(*adapted_runs, "--method", "norm,tent", "--bn-prior", best, "--lr", lr,
                                  suffix=f"-prior{best}")
                summary[model].update({f"{where}, BatchNorm prior {best}, lr {lr}": result
                                       for where, result in runs.items()})
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    for model, results in summary.items():
        if "tuning" in results:
            print(f"\n{model}: mean mIoU (%) of tent, reliable and uncertain on 0001TP by lr: "
                  + ", ".join(f"{lr}: {100 * v:.2f}" for lr, v in results["tuning"].items()))
        if "prior_tuning" in results:
            print(f"\n{model}: mean mIoU (%) of norm on 0001TP by BatchNorm prior (images): "
                  + ", ".join(f"{n}: {100 * v:.2f}" for n, v in results["prior_tuning"].items()))
        for where, conditions in results.items():
            if where.split(",")[0] in evaluations:
                for level in severities(conditions):
                    table(f"{model}, {where}, severity {level}: mIoU, ECE and Boundary IoU (%)",
                          *adaptation_rows(conditions, level))
        if "refine" in results:
            table(f"{model}, held out: refinement by guide (%)", *refinement_rows(results["refine"]))
    levels = sorted({level for results in summary.values() for level in results.get("calibration", {})})
    for level in levels:
        table(f"Held out (0006R0), severity {level}: mean ECE (%) over the held-out family's corruptions, "
              "calibrators fitted on clean val → on val under the other families",
              *calibration_rows({model: results["calibration"][level] for model, results in summary.items()
                                 if level in results.get("calibration", {})}))


def choose(prefix: Path, flag: str, values: tuple[str, ...], passes: list[str], *args: str) -> dict[str, float]:
    """value -> mean mIoU of `passes` over all conditions of `trustseg adapt *args FLAG value`, run in the
    folder `prefix` + value."""
    means = {}
    for value in values:
        tuned = prefix.with_name(prefix.name + value)
        run(tuned, None, "adapt", *args, flag, value, "--no-report")
        results = json.loads((tuned / "adapt.json").read_text())["summary"]
        means[value] = sum(results[name]["mean_mIoU"] for name in passes) / len(passes)
    return means


def highest(scores: dict[str, float]) -> str:
    return max(scores, key=scores.get)


def slim(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in ("mIoU", "mBIoU", "ECE", "refine_ms_per_image")}


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def cell(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def adapt_each(prefix: Path, evaluations: dict[str, str], *args: str, suffix: str = "") -> dict[str, dict]:
    """where -> per-condition metrics of `trustseg adapt *args` on each evaluation sequence, run in the
    folder `prefix`-<sequence><suffix>."""
    results = {}
    for where, spec in evaluations.items():
        folder = prefix.with_name(f"{prefix.name}-{folder_name(where)}{suffix}")
        run(folder, None, "adapt", "--data", spec, *args, "--no-report")
        results[where] = adaptation(folder)
    return results


def adaptation(folder: Path) -> dict:
    """condition -> pass -> the metrics the tables show, from an adapt run's adapt.json (its own summary
    pools the severities; the tables keep them apart)."""
    conditions = json.loads((folder / "adapt.json").read_text())["conditions"]
    return {key: {name: slim(metrics) for name, metrics in passes.items()} for key, passes in conditions.items()}


def severities(conditions: dict) -> list[str]:
    return sorted({key.split("/")[1] for key in conditions if "/" in key})


def adaptation_rows(conditions: dict, level: str) -> tuple[list[str], list[list[str]]]:
    """Per pass at one severity: clean mIoU, mean mIoU per corruption family and over all corruptions,
    clean and mean corrupted ECE, clean Boundary IoU."""
    corrupted = [key for key in conditions if key.endswith(f"/{level}")]
    corruptions = tuple(key.split("/")[0] for key in corrupted)
    rows, families = [], {}
    for name, clean in conditions["clean"].items():
        families = family_means({key: passes[name] for key, passes in conditions.items()}, "mIoU", corruptions,
                                (int(level),))
        values = [clean["mIoU"], *families.values(), mean([conditions[k][name]["mIoU"] for k in corrupted]),
                  clean["ECE"], mean([conditions[k][name]["ECE"] for k in corrupted]), clean["mBIoU"]]
        rows.append([name, *map(cell, values)])
    return ["pass", "clean mIoU", *families, "corrupted mIoU", "clean ECE", "corrupted ECE", "clean BIoU"], rows


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


def calibration_rows(by_model: dict) -> tuple[list[str], list[list[str]]]:
    """Per model and held-out family: the uncalibrated ECE and, per method, the ECE fitted on clean images
    → fitted under the other families (the lowest of the row in bold); the clean held-out frames first."""
    methods = list(next(iter(by_model.values()))["methods"])
    header = ["model", "held out", "uncalibrated", *methods]
    rows = []
    for model, results in by_model.items():
        clean = results["conditions"]["clean"]
        rows.append([model, "clean", *(cell(clean[m]["ECE"]) for m in ["uncalibrated", *methods])])
        for family, held_out in results["leave_one_family_out"].items():
            uncalibrated = mean_ece(results["conditions"], held_out["conditions"], "uncalibrated")
            fitted = [(mean_ece(results["conditions"], held_out["conditions"], m),
                       mean_ece(held_out["conditions"], held_out["conditions"], m)) for m in methods]
            lowest = min(uncalibrated, *(ece for pair in fitted for ece in pair))
            rows.append([model, family, bold_if(uncalibrated, lowest),
                         *(f"{bold_if(clean_fit, lowest)} → {bold_if(shifted_fit, lowest)}"
                           for clean_fit, shifted_fit in fitted)])
    return header, rows


def mean_ece(conditions: dict, keys: dict, method: str) -> float:
    """A method's mean ECE over the conditions named by `keys`."""
    return mean([conditions[key][method]["ECE"] for key in keys])


def bold_if(value: float, lowest: float) -> str:
    return f"**{cell(value)}**" if value == lowest else cell(value)


if __name__ == "__main__":
    main()
