"""Why does LTS trail temperature scaling on our CamVid runs: the fitting budget, the initialisation,
or a defect? Fits TS and LTS variants on one set of held-out images and scores them on another.

    python benchmarks/lts_budget.py --checkpoint CKPT --data camvid:../shared/data/camvid --short-side 240

Fit images: the even CamVid val images, scored on the odd ones (the same sequences, as in RESULTS.md's
interleaved-halves calibration table). Variants (Adam, one whole-image crop per step, `--epochs` passes):
- ``former default``: lr 5e-3, what `trustseg calibrate` used before this comparison, T = 1 at the start;
- ``paper lr``: Ding et al.'s lr 1e-4 ("Local Temperature Scaling for Probability Calibration", ICCV
  2021, who train 200 epochs), now the default; ``paper lr and start``: also their start, T = 2;
- ``TS start``: the same budget, starting from the TS temperature everywhere (the four temperature
  branches and the image branch biased to log T_TS), so that LTS starts where TS ended.
Prints one Markdown table: fit NLL, and on the scored images NLL, ECE and ECE on the class-boundary band.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from trustseg.calibrators.fit import fit_calibrator
from trustseg.calibrators.fit_data import collect_fit_data
from trustseg.calibrators.methods import build_calibrator
from trustseg.data.spec import load_dataset
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.report.tables import markdown_table


def start_at(calibrator, temperature: float):
    """An LTS calibrator whose map is `temperature` everywhere before fitting (exp parametrisation)."""
    with torch.no_grad():
        calibrator.logit_branches.bias[:4] = math.log(temperature)
        calibrator.image_temperature.bias[:] = math.log(temperature)
    return calibrator


def score(calibrator, scored, num_classes: int, ignore: int) -> dict[str, float]:
    metric = CalibrationHistogram(num_classes, ignore_index=ignore, classwise=False)
    with torch.no_grad():
        for logits, image, mask in scored:
            metric.update(calibrator(logits[None], image[None]), mask[None])
    result = metric.compute()
    return {"NLL": result["NLL"], "ECE": 100 * result["ECE"], "ECE_boundary": 100 * result["ECE_boundary"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="a dataset spec without options, e.g. camvid:PATH")
    parser.add_argument("--short-side", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=20, help="Adam passes over the fit crops (trustseg's default; "
                        "the paper trains 200)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    checkpoint = load_checkpoint(args.checkpoint)
    predictor = predictor_from_checkpoint(checkpoint, InferenceConfig(short_side=args.short_side))
    fit_set = load_dataset(f"{args.data}#split=val,images=0::2")
    scored_set = load_dataset(f"{args.data}#split=val,images=1::2")
    classes = fit_set.classes
    data = collect_fit_data(predictor, fit_set, max_crops=64, crop_size=1024, progress=False)
    scored = []
    with torch.inference_mode():
        for i in range(len(scored_set)):
            sample = scored_set[i]
            scored.append((predictor(sample["image"][None])[0].float(), sample["image"], sample["mask"]))

    rows, results = [], {}

    def add(name: str, calibrator, seconds: float, fit_nll: float) -> None:
        results[name] = score(calibrator, scored, classes.num_classes, classes.ignore_index)
        r = results[name]
        rows.append([name, f"{seconds:.0f}", f"{fit_nll:.4f}", f"{r['NLL']:.4f}", f"{r['ECE']:.2f}",
                     f"{r['ECE_boundary']:.2f}"])
        print(rows[-1], flush=True)

    identity = build_calibrator("ts", classes.num_classes)
    add("uncalibrated", identity, 0, float("nan"))
    ts = build_calibrator("ts", classes.num_classes)
    report = fit_calibrator(ts, data, ignore_index=classes.ignore_index)
    t_ts = float(ts.summary()["temperature"])
    add(f"ts (T = {t_ts:.2f})", ts, report.seconds, report.nll_after)

    e = args.epochs
    variants = [  # (name, Adam lr, epochs, T at the start)
        (f"lts, former default (lr 5e-3, {e} epochs, T0 = 1)", 5e-3, e, 1.0),
        (f"lts, paper lr (lr 1e-4, {e} epochs, T0 = 1): the default", 1e-4, e, 1.0),
        (f"lts, paper lr and start (lr 1e-4, {e} epochs, T0 = 2)", 1e-4, e, 2.0),
        (f"lts, TS start (lr 1e-4, {e} epochs, T0 = T_TS)", 1e-4, e, t_ts),
    ]
    for name, lr, epochs, start in variants:
        lts = start_at(build_calibrator("lts", classes.num_classes), start)
        started = copy.deepcopy(lts) if start == t_ts else None
        begin = time.perf_counter()
        report = fit_calibrator(lts, data, ignore_index=classes.ignore_index, lr=lr, epochs=epochs)
        add(name, lts, time.perf_counter() - begin, report.nll_after)
        if started is not None:
            add("(its start: LTS at T_TS, unfitted)", started.eval(), 0, report.nll_before)
    print()
    print(markdown_table(["method", "fit s", "fit NLL", "NLL", "ECE %", "boundary ECE %"], rows))


if __name__ == "__main__":
    main()
