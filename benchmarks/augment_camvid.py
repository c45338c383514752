"""Does preserving the high-entropy classes beat random selection at equal tau? The CamVid experiment of
uncertainty-guided synthetic data (Röhrich et al., "Preserve the Hard, Regenerate the Rest", 2026),
through the trustseg commands a user would run.

    python benchmarks/augment_camvid.py --camvid ../shared/data/camvid --out runs/augment_camvid

1. Baseline: the 6-block ViT-Ti/16 of configs/camvid_pos_embedding.yaml (no positional embedding)
   trained on CamVid train **without sequence 0006R0** (train images 0:62 and 163:), which is held out.
2. Per seed and backend (opencv, texture): `trustseg augment` with the baseline at tau = 0.1 and each
   selector (entropy-high = the method, random-class, random-region), on the same training images.
3. Fine-tuning from the baseline for the same number of steps at a tenth of its learning rate, on
   real + synthetic 1:1, and on real data alone (the control: the same steps without synthetic data).
4. `trustseg eval` of every model at the training resolution on CamVid val (sequence 0016E5, which the
   training frames share) and on the held-out sequence 0006R0.

Every step skips what its output folder already holds, so an interrupted run continues. Prints one
Markdown table (mIoU and the rare classes' IoU) and writes it with every number to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from camvid_runs import evaluation_specs, folder_name, train_without_held_out, trustseg

RARE = ("Pole", "SignSymbol", "Fence", "Pedestrian")
SELECTORS = ("entropy-high", "random-class", "random-region")
RECIPE = "configs/camvid_pos_embedding.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--camvid", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baseline-steps", type=int, default=1200)
    parser.add_argument("--finetune-steps", type=int, default=400)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--backends", default="opencv,texture")
    parser.add_argument("--tau", default="0.1")
    parser.add_argument("--max-images", type=int, default=None, help="synthetic images per run (a smoke test)")
    args = parser.parse_args()
    limit = [] if args.max_images is None else ["--max-images", str(args.max_images)]
    out, camvid = args.out, args.camvid
    train, evaluations = train_without_held_out(camvid), evaluation_specs(camvid)
    common = ["--set", "model.options.pos=none", "--set", f"data.val=camvid:{camvid}#split=val"]

    baseline = out / "baseline"
    if not (baseline / "metrics.json").is_file():
        trustseg("train", "--config", RECIPE, *common, "--set", f"steps={args.baseline_steps}", "--data", train,
                 "--out", str(baseline), "--no-report")
    base_lr = yaml.safe_load(Path(RECIPE).read_text())["optim"]["lr"]

    models = {"baseline": baseline / "last.pt"}
    for seed in map(int, args.seeds.split(",")):
        finetune = ["--set", f"model.init_from={baseline / 'last.pt'}", "--set", f"optim.lr={base_lr / 10}",
                    "--set", "schedule.warmup_steps=0", "--set", f"steps={args.finetune_steps}", "--set", f"seed={seed}"]
        control = out / f"real-only-seed{seed}"
        if not (control / "metrics.json").is_file():
            trustseg("train", "--config", RECIPE, *common, *finetune, "--data", train, "--out", str(control), "--no-report")
        models[f"real only, seed {seed}"] = control / "last.pt"
        for backend in args.backends.split(","):
            for selector in SELECTORS:
                synthetic = out / "data" / f"{backend}-{selector}-seed{seed}"
                if not (synthetic / "manifest.json").is_file():
                    trustseg("augment", "--checkpoint", str(baseline / "last.pt"), "--data", train, "--split", "train",
                             "--backend", backend, "--selector", selector, "--tau", args.tau, "--seed", str(seed),
                             "--short-side", "240", "--out", str(synthetic),
                             *(["--resume"] if synthetic.exists() else []), *limit)
                run = out / f"{backend}-{selector}-seed{seed}"
                if not (run / "metrics.json").is_file():
                    # real (its two parts weighted by their sizes) : synthetic = 1 : 1
                    trustseg("train", "--config", RECIPE, *common, *finetune, "--data",
                             f"{train}+folder:{synthetic}#ratio=62:204:266", "--out", str(run), "--no-report")
                models[f"{backend}, {selector}, seed {seed}"] = run / "last.pt"

    results = {}
    for name, checkpoint in models.items():
        results[name] = {}
        for where, spec in evaluations.items():
            folder = checkpoint.parent / "eval" / folder_name(where)
            if not (folder / "metrics.json").is_file():
                trustseg("eval", "--checkpoint", str(checkpoint), "--data", spec, "--short-side", "240", "--out",
                         str(folder), "--no-report", "--uncertainty", "none", "--no-boundary-iou")
            metrics = json.loads((folder / "metrics.json").read_text())
            names = metrics["class_names"]
            results[name][where] = {"mIoU": metrics["mIoU"],
                                    **{c: metrics["per_class"]["IoU"][names.index(c)] for c in RARE}}
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    header = ["model", *(f"{where} {m}" for where in evaluations for m in ("mIoU", "rare"))]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, by_where in results.items():
        cells = []
        for where in evaluations:
            r = by_where[where]
            cells += [f"{100 * r['mIoU']:.2f}", " / ".join(f"{100 * (r[c] or 0):.1f}" for c in RARE)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"rare classes: {' / '.join(RARE)} IoU (%)")


if __name__ == "__main__":
    main()
