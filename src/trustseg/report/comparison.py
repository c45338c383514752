"""The comparison page of several runs, and the agreement of metrics across corruption conditions.

Side by side: every metric with a direction that some run reports; the ranking per metric; Kendall's
tau-b between metrics across the runs and across corruption conditions (when runs hold a
robustness.json); sentences where the best run differs by aspect; and, for every two runs that both
hold per-image confusion matrices of the same images, a paired bootstrap interval of their mIoU
difference, so a real gain can be told from noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import torch

from trustseg.errors import UserError
from trustseg.report.compare import (
    HEADLINE,
    bootstrap_miou_difference,
    direction,
    disagreements,
    opposed,
    kendall_tau_b,
    ranked_metrics,
    ranking,
    ranking_text,
    tau_matrix,
)
from trustseg.report.document import Document
from trustseg.report.pages import PER_IMAGE_CONFUSION_FILE, RunFiles, run_page
from trustseg.report.plots import heatmap
from trustseg.report.tables import UNSCALED, percent

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
# image-quality measures stored per condition, and the metrics whose change they should predict
QUALITY_TARGETS = ("mIoU", "ECE")


def shown(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.4f}" if metric in UNSCALED else percent(value)


def tau_table(taus, metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    return ["", *metrics], [[m, *("nan" if math.isnan(t) else f"{t:+.2f}" for t in row)]
                            for m, row in zip(metrics, taus)]


def headline(metrics: Sequence[str]) -> list[str]:
    """The `HEADLINE` metrics among `metrics`, in that order."""
    return [m for m in HEADLINE if m in metrics]


def condition_rows(run: RunFiles) -> dict[str, dict[str, float]]:
    """robustness.json's conditions as condition -> metric -> value (metrics with a direction, and the
    image-quality measures under ``quality``), NaN for null."""
    rows = {}
    for key, condition in run.read("robustness.json")["conditions"].items():
        row = {m: math.nan if v is None else float(v) for m, v in condition.items()
               if direction(m) and (v is None or isinstance(v, (int, float)))}
        row.update({m: math.nan if v is None else float(v) for m, v in condition.get("quality", {}).items()})
        rows[key] = row
    return rows


def condition_agreement(run: RunFiles, page: Document, folder: Path) -> None:
    """Across the run's corruption conditions: tau between metrics, and which image-quality measure
    predicts the drop in mIoU and the rise in ECE."""
    rows = condition_rows(run)
    if len(rows) < 3:
        return
    metrics = headline(ranked_metrics(rows))
    page.heading("Agreement of metrics across conditions").paragraph(
        f"Kendall's tau-b over the {len(rows)} conditions, each metric oriented so that higher is better: +1 means "
        "two metrics order the conditions alike, -1 in reverse.")
    taus = tau_matrix(rows, metrics)
    page.table(*tau_table(taus, metrics))
    for sentence in opposed(taus, metrics, "conditions"):
        page.paragraph(sentence)
    quality = sorted({m for row in rows.values() for m in row if not direction(m)})
    targets = [m for m in QUALITY_TARGETS if m in metrics]
    if quality:
        page.heading("Image quality per condition").paragraph(
            "Means over the images the model saw: PSNR (dB) and SSIM against the clean image (PSNR of clean "
            "data is infinite: nan), noise (Immerkaer's estimate, grey levels), sharpness (variance of the "
            "Laplacian), RMS contrast, colourfulness (Hasler and Suesstrunk).")
        page.table(["condition", *quality], [[key, *(_measure(row.get(q)) for q in quality)] for key, row in rows.items()])
    if quality and targets:
        page.heading("Image quality and performance").paragraph(
            "Kendall's tau-b across conditions between each image-quality measure of the corrupted images (mean "
            "over images) and the metric, raw values (not oriented). The measure with the largest |tau| with "
            "mIoU predicts the drop best.")
        taus = {q: [kendall_tau_b([r.get(q, math.nan) for r in rows.values()], [r[t] for r in rows.values()])
                    for t in targets] for q in quality}
        page.table(["measure", *(f"tau with {t}" for t in targets)],
                   [[q, *(("nan" if math.isnan(t) else f"{t:+.2f}") for t in values)] for q, values in taus.items()])
        finite = {q: abs(v[0]) for q, v in taus.items() if not math.isnan(v[0])}
        if finite:
            best = max(finite, key=finite.get)
            page.paragraph(f"{best} predicts the change in {targets[0]} best across these conditions "
                           f"(tau = {taus[best][0]:+.2f}).")


def _measure(value: float | None) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4g}"


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, suffixed with -2, -3, ... where two runs share one."""
    names, seen = [], {}
    for path in paths:
        base = Path(path).resolve().name
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def comparison_page(runs: Sequence[RunFiles], folder: Path) -> Document:
    table = {run.name: run.scalars() for run in runs}
    metrics = [m for m in dict.fromkeys(m for row in table.values() for m in row) if direction(m)]
    if not metrics:
        raise UserError("none of the runs holds metrics to compare (metrics.json or robustness.json)")
    page = Document(f"Comparison of {len(runs)} runs")
    page.paragraph("Percentages except NLL and Brier. Arrows: which way is better.")
    header = ["metric", *table, "best"]
    rows = []
    for metric in metrics:
        values = {run: row.get(metric, math.nan) for run, row in table.items()}
        top = values[ranking(values, metric)[0]]
        best = ", ".join(run for run, v in values.items() if v == top) if math.isfinite(top) else "-"
        rows.append([f"{metric} {'↑' if direction(metric) > 0 else '↓'}",
                     *(shown(metric, v) for v in values.values()), best])
    page.heading("Side by side").table(header, rows)
    page.heading("Ranking per metric").table(
        ["metric", "best to worst"],
        [[m, ranking_text({run: row.get(m, math.nan) for run, row in table.items()}, m)] for m in metrics])
    sentences = disagreements(table)
    page.heading("Where the metrics disagree").paragraph(
        " ".join(sentences) if sentences else "The same run is best on every aspect measured here.")
    common = headline(ranked_metrics(table))
    if len(runs) >= 3 and len(common) >= 2:
        page.heading("Kendall's tau between metrics across runs").paragraph(
            "Each metric oriented so that higher is better: +1 means two metrics rank the runs alike.")
        taus = tau_matrix(table, common)
        page.table(*tau_table(taus, common))
        for sentence in opposed(taus, common, "runs"):
            page.paragraph(sentence)
    elif len(common) >= 2:
        page.paragraph("Kendall's tau between metrics across runs needs at least 3 runs.")
    _conditions_section(runs, page, folder)
    _bootstrap_section(runs, page)
    return page


def _conditions_section(runs: Sequence[RunFiles], page: Document, folder: Path) -> None:
    robust = [run for run in runs if run.has("robustness.json")]
    if not robust:
        return
    pooled = {f"{run.name} {key}": row for run in robust for key, row in condition_rows(run).items()}
    metrics = headline(ranked_metrics(pooled))
    if len(pooled) >= 3 and len(metrics) >= 2:
        taus = tau_matrix(pooled, metrics)
        page.heading("Kendall's tau between metrics across corruption conditions").paragraph(
            f"Over {len(pooled)} (run, condition) pairs from {len(robust)} run(s) with a robustness.json.")
        page.table(*tau_table(taus, metrics))
        for sentence in opposed(taus, metrics, "conditions"):
            page.paragraph(sentence)
        page.image(heatmap(taus, metrics, metrics, folder / "tau_conditions.png", title="Kendall's tau across conditions",
                           colorbar_label="tau", percent=False), "Kendall's tau between metrics across conditions")
    if len(robust) >= 2:
        grids = {run.name: {k: r.get("mIoU", math.nan) for k, r in condition_rows(run).items()} for run in robust}
        keys = [k for k in next(iter(grids.values())) if all(k in g for g in grids.values())]
        page.heading("mIoU per condition").table(
            ["condition", *grids], [[k, *(percent(g[k]) for g in grids.values())] for k in keys])


def _bootstrap_section(runs: Sequence[RunFiles], page: Document) -> None:
    holders = [run for run in runs if run.has(PER_IMAGE_CONFUSION_FILE)]
    rows = []
    for a, b in combinations(holders, 2):
        first, second = (torch.from_numpy(run.read(PER_IMAGE_CONFUSION_FILE)) for run in (a, b))
        if first.shape != second.shape or a.class_names() != b.class_names():
            rows.append([a.name, b.name, "-", "-", "not the same images and classes"])
            continue
        interval = bootstrap_miou_difference(first, second, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED)
        verdict = ("yes" if interval.excludes_zero else "no: within noise") if math.isfinite(interval.low) else "-"
        rows.append([a.name, b.name, f"{100 * interval.difference:+.2f}",
                     f"[{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]", verdict])
    if rows:
        page.heading("Is the mIoU difference real?").paragraph(
            f"Paired bootstrap over images ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}): each resample "
            "draws the images with replacement, sums both runs' per-image confusion matrices over them and "
            "takes the difference of the dataset-level mIoUs (points). 95% percentile interval; a difference "
            "is real when the interval excludes 0. Needs `trustseg eval --per-image` on the same data.")
        page.table(["run A", "run B", "Δ mIoU (A - B)", "95% interval", "real difference"], rows)


def write_reports(run_dirs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """The page of each run in ``out/<run name>/`` and, for two or more runs, ``out/comparison.html``
    (and .md). Returns the HTML files written."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    out = Path(out)
    runs = [RunFiles(path, name) for path, name in zip(run_dirs, unique_names([Path(p) for p in run_dirs]))]
    pages = []
    for run in runs:
        folder = out / run.name if len(runs) > 1 else out
        pages.append(run_page(run, folder).write(folder)[1])
    if len(runs) > 1:
        out.mkdir(parents=True, exist_ok=True)
        pages.append(comparison_page(runs, out).write(out, "comparison")[1])
    return pages
