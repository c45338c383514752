"""One accuracy–cost frontier from several `trustseg compress` runs of the same checkpoint and data.

    python benchmarks/compression_frontier.py RUN_DIR [RUN_DIR ...] --out DIR

Runs must share the checkpoint (sha256), data, split, images, corruption set and inference settings;
their uncompressed baselines must agree. A method measured in several runs keeps its first
measurement. Writes the four frontier plots and prints the cost-and-accuracy table (Markdown).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trustseg.report.plots import line_plot
from trustseg.report.tables import markdown_table
from trustseg.workflows.compress import UNCOMPRESSED, cost_rows, curve_name, frontier_series

SHARED = ("checkpoint_sha256", "data", "split", "num_images", "corruptions", "severities", "inference")


def _without_nulls(value):
    """Options a later version added with the value null are the same setup as their absence."""
    return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value


def load(runs: list[Path]) -> tuple[dict, dict]:
    baseline, methods, reference = None, {}, None
    for run in runs:
        results = json.loads((run / "compression.json").read_text())
        setup = {key: _without_nulls(results["setup"].get(key)) for key in SHARED}
        if reference is not None and setup != reference:
            raise SystemExit(f"{run}: measured on another setup than {runs[0]}: {setup} vs {reference}")
        reference = setup
        base = results["uncompressed"]
        if baseline is not None and (base["clean_mIoU"], base["corrupted_mIoU"]) != (
                baseline["clean_mIoU"], baseline["corrupted_mIoU"]):
            raise SystemExit(f"{run}: its uncompressed model scores differently from {runs[0]}'s")
        baseline = baseline or base
        for name, entry in results["methods"].items():
            label = name + (" (fine-tuned)" if entry.get("finetune") else "")
            methods.setdefault(label, entry)
    for entry in [baseline, *methods.values()]:
        entry.setdefault("relative_latency", 1 / entry["speedup"])  # runs written before it was stored
    return baseline, methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    baseline, methods = load(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    for x, xlabel in (("gflops", "GFLOPs per image"), ("relative_latency", "latency relative to uncompressed")):
        for y, what in (("clean_mIoU", "clean"), ("corrupted_mIoU", "corrupted")):
            path = line_plot(frontier_series(baseline, methods, x, y), args.out / f"frontier_{what}_{x}.png",
                             title=f"{what} mIoU vs {xlabel}", xlabel=xlabel, ylabel="mIoU (%)")
            print(path)
    header, rows = cost_rows(baseline, dict(sorted(methods.items(), key=lambda item: curve_name(item[1]))))
    print(markdown_table(header, [[UNCOMPRESSED, *rows[0][1:]], *rows[1:]]))


if __name__ == "__main__":
    main()
