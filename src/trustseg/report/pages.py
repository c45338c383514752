"""Every report page, rebuilt from what a command left in its run directory.

A run's page is a list of sections; each section is a function ``(run, page, folder)`` that appends its
blocks to the page and writes its figures into `folder`, registered in `SECTIONS` under the file it
needs. A section appears when its file is in the run directory, so a new capability adds a file and a
section, never a page generator. The comparison of several runs (`trustseg.report.comparison`) uses
the same run reader.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trustseg.engine.checkpoint import atomic_write
from trustseg.errors import UserError
from trustseg.report.document import Document
from trustseg.report.gallery import GALLERY_INDEX
from trustseg.report.plots import bar_plot, heatmap, line_plot, reliability_diagrams
from trustseg.report.tables import calibration_rows, per_class_rows, percent, summary_rows

CONFUSION_FILE = "confusion_matrix.npy"
PREDICTIONS_FILE = "predictions.json"
PER_IMAGE_CONFUSION_FILE = "per_image_confusion.npy"
# the largest confusion matrix whose heatmap gets a number in each cell
_LABELLED_CELLS = 30
_SHOWN_PREDICTIONS = 6


def write_array(path: Path, array: Any) -> Path:
    """Save a tensor or array as .npy atomically (a failed write keeps the previous file)."""
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return Path(path)


class RunFiles:
    """The files of one run directory, read on first use; a damaged file is a UserError naming it."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"run directory {self.path}: not found or not a directory")
        self.name = name or self.path.resolve().name
        self._cache: dict[str, Any] = {}

    def has(self, file: str) -> bool:
        return (self.path / file).is_file()

    def read(self, file: str) -> Any:
        """The content of `file`: parsed JSON, YAML, JSON lines (a list) or a NumPy array."""
        if file not in self._cache:
            path = self.path / file
            try:
                if file.endswith(".npy"):
                    value: Any = np.load(path, allow_pickle=False)
                elif file.endswith(".jsonl"):
                    value = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                elif file.endswith((".yaml", ".yml")):
                    value = yaml.safe_load(path.read_text(encoding="utf-8"))
                else:
                    value = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise UserError(f"{path}: file not found") from None
            except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as error:
                raise UserError(f"{path}: cannot be read ({type(error).__name__}); was it written by trustseg?") from None
            self._cache[file] = value
        return self._cache[file]

    def class_names(self) -> list[str]:
        for file in ("metrics.json", "robustness.json"):
            if self.has(file):
                names = self.read(file).get("class_names")
                if isinstance(names, list):
                    return [str(n) for n in names]
        return []

    def scalars(self) -> dict[str, float]:
        """The run's headline numbers by metric name: metrics.json's scalars, then (for a robustness run)
        the clean condition's metrics and the robustness summary."""
        found: dict[str, float] = {}
        sources = [self.read("metrics.json")] if self.has("metrics.json") else []
        if self.has("robustness.json"):
            results = self.read("robustness.json")
            sources += [results.get("conditions", {}).get("clean", {}), results.get("summary", {})]
        for source in sources:
            for key, value in source.items():
                if key not in found and key != "num_images" and _is_number(value):
                    found[key] = float(value) if value is not None else math.nan
        return found


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# ------------------------------------------------------------------------------------------ sections


def config_section(run: RunFiles, page: Document, folder: Path) -> None:
    config = run.read("config.yaml") or {}
    rows = [[str(k), _short(v)] for k, v in config.items()]
    page.heading("Configuration").table(["setting", "value"], rows)


def metrics_section(run: RunFiles, page: Document, folder: Path) -> None:
    metrics = run.read("metrics.json")
    names = run.class_names()
    header, rows = summary_rows(metrics)
    calibration = calibration_rows(metrics)
    if header or calibration[0]:  # a robustness run's metrics.json holds its summary only (its own section)
        page.heading("Metrics")
        page.paragraph("Percentages. mIoU is dataset-level (one confusion matrix over all images, NaN-mean over the "
                       "classes present); mIoU_img is the mean of per-image mIoUs. ECE: top-label, equal-width bins.")
    if header:
        page.table(header, rows)
    if calibration[0]:
        page.table(*calibration)
    if isinstance(metrics.get("reliability"), dict):
        page.image(reliability_plot({"all pixels": metrics["reliability"]}, folder / "reliability_eval.png",
                                    "Reliability"), "reliability diagram: accuracy per confidence bin")
    per_class = metrics.get("per_class", {})
    support = per_class.get("support")
    if support and names:
        total = sum(support) or 1
        images = f"{metrics['num_images']} images, " if "num_images" in metrics else ""
        page.heading("Data").paragraph(f"{images}{total} labelled pixels; class frequencies are the share of "
                                       "labelled pixels.")
        page.image(class_frequency_plot(names, [s / total for s in support], folder), "class frequencies")
    if per_class.get("IoU") and names:
        page.heading("Per class").table(*per_class_rows(metrics, names))
        page.image(bar_plot(names, [100 * _finite(v) for v in per_class["IoU"]], folder / "per_class_iou.png",
                            title="IoU per class", ylabel="IoU (%)"), "IoU per class (absent classes at 0)")


def confusion_section(run: RunFiles, page: Document, folder: Path) -> None:
    matrix = run.read(CONFUSION_FILE).astype(float)
    names = run.class_names() or [str(i) for i in range(len(matrix))]
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.full_like(matrix, np.nan), where=rows > 0)
    plot = heatmap(normalised, names, names, folder / "confusion_matrix.png", percent=len(names) <= _LABELLED_CELLS,
                   title="Confusion matrix, each ground-truth row normalised", colorbar_label="share of the row")
    page.heading("Confusion matrix").image(plot, "rows: ground truth, columns: prediction; rows of absent classes blank")


def gallery_section(run: RunFiles, page: Document, folder: Path) -> None:
    gallery = run.read(GALLERY_INDEX)
    page.heading("Predictions").paragraph(f"Columns: {gallery['columns']}.")
    for entry in gallery["images"]:
        page.image(run.path / entry["file"], entry["caption"])


def predictions_section(run: RunFiles, page: Document, folder: Path) -> None:
    """`trustseg predict`: what the model predicted over all images and, with uncertainty maps, which
    images it doubts most (the ones to look at or to label first)."""
    summary = run.read(PREDICTIONS_FILE)
    names, images, method = summary["class_names"], summary["images"], summary["uncertainty"]
    totals = np.sum([entry["class_pixels"] for entry in images], axis=0) if images else np.zeros(len(names))
    share = totals / max(totals.sum(), 1)
    page.heading("Predictions").paragraph(
        f"{len(images)} images; uncertainty: {method or 'not computed (--uncertainty)'}. Shares are of all "
        "predicted pixels.")
    page.table(["class", "predicted pixels", "share (%)"],
               [[name, str(int(count)), percent(value)] for name, count, value in zip(names, totals, share)])
    if images:
        page.image(bar_plot(names, [100 * v for v in share], folder / "predicted_classes.png",
                            title="Predicted classes", ylabel="% of predicted pixels"), "predicted class shares")
    if method:
        shown = sorted(images, key=lambda entry: -entry["mean_uncertainty"])[:_SHOWN_PREDICTIONS]
        page.heading("Most uncertain images").table(
            ["image", "size (HxW)", f"mean {method}", "main class"],
            [[e["name"], "x".join(map(str, e["size"])), f"{e['mean_uncertainty']:.4f}",
              names[int(np.argmax(e["class_pixels"]))]] for e in shown])
    else:
        shown = images[:_SHOWN_PREDICTIONS]
    for entry in shown:
        for key, what in (("overlay", "prediction overlay"), ("uncertainty_png", f"{method} (bright: uncertain)")):
            if key in entry["files"]:
                page.image(run.path / entry["files"][key], f"{entry['name']}: {what}")


def training_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.training.history import History

    plots = History(run.read("history.jsonl")).plot(folder)
    if plots:
        page.heading("Training")
        for plot in plots:
            page.image(plot, plot.stem.replace("_", " "))


def robustness_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.robustness.corruptions import FAMILIES
    from trustseg.robustness.summary import CLEAN, miou_grid
    from trustseg.workflows.robustness import corruption_rows, summary_rows as robustness_rows

    results = run.read("robustness.json")
    setup, summary, conditions = results.get("setup", {}), results["summary"], results["conditions"]
    corruptions = list(summary["per_corruption"])
    severities = sorted({int(key.split("/")[1]) for key in conditions if key != CLEAN})
    grid = miou_grid(conditions, corruptions, severities)
    clean = _value(summary["clean_mIoU"])
    page.heading("Robustness").paragraph(
        f"Data {setup.get('data', '?')}, {setup.get('num_images', '?')} images; corruptions applied on the fly at the "
        f"images' native resolution, seed {setup.get('seed', '?')}; frost textures: {setup.get('frost_source', '?')}. "
        "Values are percentages.")
    page.table(*robustness_rows(summary))
    page.table(["family", "mean mIoU"], [[f, percent(v)] for f, v in summary["per_family_mIoU"].items()
                                         if v is not None and not math.isnan(v)])
    page.heading("Per corruption").table(*corruption_rows(summary, conditions, tuple(severities)))
    page.image(heatmap([[clean, *map(_value, grid[n])] for n in corruptions], corruptions,
                       ["clean", *map(str, severities)], folder / "robustness_heatmap.png",
                       title="mIoU (%) under corruption", colorbar_label="mIoU (%)"), "robustness heatmap")
    for family, members in FAMILIES.items():
        series = {n: ([0, *severities], [100 * _value(m) for m in [clean, *grid[n]]]) for n in members if n in grid}
        if series:
            page.image(line_plot(series, folder / f"robustness_{family}.png", title=f"{family} corruptions",
                                 xlabel="severity (0 = clean)", ylabel="mIoU (%)"), f"robustness {family}")
    panels = {key: conditions[key]["reliability"] for key in
              [CLEAN, *(f"{name}/{severities[-1]}" for name in corruptions)][:8]
              if isinstance(conditions.get(key, {}).get("reliability"), dict)}
    if panels:
        page.image(reliability_plot(panels, folder / "reliability_conditions.png", "Reliability under corruption"),
                   f"reliability diagrams, clean and each corruption at severity {severities[-1]}")
    from trustseg.report.comparison import condition_agreement

    condition_agreement(run, page, folder)


def calibration_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.robustness.summary import CLEAN
    from trustseg.workflows.calibration import method_rows
    from trustseg.workflows.calibration_shift import BEST_BY, lofo_rows

    results = run.read("calibration.json")
    setup, methods, conditions = results["setup"], results["methods"], results["conditions"]
    page.heading("Calibration").paragraph(
        f"Fitted on {setup.get('fit_data', '?')}; evaluated on {setup.get('data', '?')}. ECE family: top-label, "
        f"{setup.get('num_bins', '?')} equal-width bins, all labelled pixels (ECE_boundary: within 5 px of a class "
        "edge; ECE_img_mean: per-image mean). Percentages except NLL and Brier. Δ mIoU is against the uncalibrated "
        "model; changed px is the share of pixels whose predicted class the calibrator changed.")
    fit_corruptions, held_out = setup.get("fit_corruptions") or [], results.get("leave_one_family_out")
    if fit_corruptions and not held_out:
        evaluated = {key.split("/")[0] for key in conditions if key != CLEAN}
        page.paragraph(f"Fit under shift (Tomani et al., CVPR 2021): each fit image clean or corrupted by one of "
                       f"{', '.join(fit_corruptions)} at severity {', '.join(map(str, setup.get('fit_severities', [])))}, "
                       "drawn per image from the seed; the evaluation corruptions "
                       + ("may overlap them (--allow-overlap)." if evaluated & set(fit_corruptions)
                          else "are all unseen in fitting."))
    for key, condition in conditions.items():
        page.heading("Clean data" if key == CLEAN else f"Under {key}").table(*method_rows(methods, condition))
    best = results.get("best_decision_preserving")
    if best:
        page.heading("Best decision-preserving method per condition").paragraph(
            f"Lowest {BEST_BY} among the methods that keep every pixel's predicted class (so the segmentation "
            "map stays the model's) and the uncalibrated model.")
        page.table(["condition", "method", BEST_BY, f"uncalibrated {BEST_BY}"],
                   [[key, b["method"], percent(b[BEST_BY]), percent(b[f"uncalibrated_{BEST_BY}"])]
                    for key, b in best.items()])
    if held_out:
        page.heading("Leave one corruption family out").paragraph(
            "The calibrators above are fitted on clean fit images. For each family of the evaluation corruptions, "
            "every method is fitted again on the same fit images, each clean or corrupted by a drawn one of the "
            f"other families' fit corruptions (severities {', '.join(map(str, setup.get('fit_severities', [])))}), "
            "and evaluated on the held-out family: ECE of both fits, percentages; negative Δ: the corruption fit "
            "is better calibrated on a shift it never saw.")
        page.table(*lofo_rows(conditions, held_out))
        page.table(["condition", "best decision-preserving (fitted w/o family)", BEST_BY],
                   [[key, b["method"], percent(b[BEST_BY])] for entry in held_out.values()
                    for key, b in entry["best_decision_preserving"].items()])
    fits = [[m, f"{r['fit']['seconds']:.1f} s", r["fit"]["on"], f"{r['fit']['nll_before']:.4f}",
             f"{r['fit']['nll_after']:.4f}", ", ".join(f"{k} {v:.3g}" for k, v in r["parameters"].items())]
            for m, r in methods.items()]
    page.heading("Fits").table(["method", "time", "fitted on", "NLL before", "NLL after", "parameters"], fits)
    selection = results.get("selection")
    if selection is not None:
        page.heading("Choice of the saved method").paragraph(
            f"--save {selection['rule']}: the lowest {selection['score']} on the last {selection['holdout_images']} "
            f"fit image(s), held out from fitting, among {selection['among']}; the evaluation data plays no part. "
            f"Chosen: {selection['chosen']}.")
        page.table(["method", "held-out NLL", "held-out ECE", "candidate"],
                   [[name, f"{s['NLL']:.4f}", percent(s["ECE"]), "yes" if name in selection["candidates"] else "no"]
                    for name, s in selection["scores"].items()])
    if results.get("saved"):
        page.paragraph(f"Calibrated checkpoint: {results['saved']} (trustseg eval/predict apply its calibrator).")
    if CLEAN in conditions:
        page.image(reliability_diagrams({name: r["reliability"] for name, r in conditions[CLEAN].items()},
                                        folder / "reliability.png", title="Reliability on clean data"),
                   "reliability diagrams, clean data")


def resolution_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.workflows.pos_embedding import resolution_rows, verdict

    results = run.read("pos_embedding.json")
    summary, recipe = results["summary"], results.get("setup", {}).get("recipe", {})
    config = run.read("config.yaml") if run.has("config.yaml") else {}
    base_size = (recipe.get("data") or {}).get("base_size")
    budget = f"{config['budget_min']} min" if config.get("budget_min") else f"{recipe.get('steps', '?')} steps"
    scales = sorted({float(s) for entry in summary.values() for s in entry["mIoU"]})
    keys = [str(s) for s in scales]
    series = {v: (scales, [100 * _finite(e["mIoU"][k]["mean"]) for k in keys]) for v, e in summary.items()}
    errors = {v: [100 * _finite(e["mIoU"][k]["std"]) for k in keys] for v, e in summary.items()}
    page.heading("Positional embeddings across test resolutions").paragraph(
        f"APE, RoPE, none and Active Spatial Guidance. Data {config.get('data', '?')}; recipe "
        f"{config.get('recipe') or 'built-in pos_embedding.yaml'} ({(recipe.get('model') or {}).get('options', {})}); "
        f"{config.get('seeds', '?')} seed(s) per variant, {budget} each. mIoU (%) of the final model, mean ± standard "
        f"deviation over seeds, at each test resolution (x1 = the training resolution: short side "
        f"{min(base_size) if base_size else 'as stored'}). Probe error: mean distance in patches between the "
        "(row, col) a linear probe reads from the frozen final tokens of held-out val images and the true one; "
        "centre error: that of always answering the mean position.")
    page.table(*resolution_rows(summary, tuple(scales)))
    page.paragraph(verdict(summary))
    page.image(line_plot(series, folder / "resolution_transfer.png", title="mIoU vs test resolution",
                         xlabel="test resolution (x training resolution)", ylabel="mIoU (%)", errors=errors),
               "mIoU vs test resolution, error bars: std over seeds")


def compression_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.workflows.compress import UNCOMPRESSED, cost_rows, frontier_series

    results = run.read("compression.json")
    setup, baseline, methods = results["setup"], results["uncompressed"], results["methods"]
    corrupted = ", ".join(f"{n} s{s}" for n in setup["corruptions"] for s in setup["severities"])
    height, width = baseline["cost_size"]
    page.heading("Compression").paragraph(
        f"Data {setup['data']}. GFLOPs: counted on the real forward (merging included), mean over the first "
        f"{setup.get('cost_images', 1)} image(s) as the model sees them ({height}x{width}). Latency: median of "
        f"batch-1 forwards of the first image, timed in turn with the {UNCOMPRESSED} model within each method's "
        "measurement, so the speed-up (and the relative latency of the frontier) compares like with like even "
        f"when the machine's load changes between methods. Corrupted mIoU: mean over {corrupted}. mIoU values "
        "are percentages.")
    page.table(*cost_rows(baseline, methods))
    if not methods:
        return
    page.heading("Accuracy–cost frontier")
    for x, xlabel in (("gflops", "GFLOPs per image"), ("relative_latency", "latency relative to uncompressed")):
        for y, what in (("clean_mIoU", "clean"), ("corrupted_mIoU", "corrupted")):
            path = line_plot(frontier_series(baseline, methods, x, y), folder / f"frontier_{what}_{x}.png",
                             title=f"{what} mIoU vs {xlabel}", xlabel=xlabel, ylabel="mIoU (%)")
            page.image(path, f"{what} mIoU vs {xlabel}")


def adaptation_section(run: RunFiles, page: Document, folder: Path) -> None:
    from trustseg.workflows.adapt import condition_rows

    results = run.read("adapt.json")
    setup, summary, conditions, passes = results["setup"], results["summary"], results["conditions"], results["passes"]
    adaptation, refine = setup["adaptations"][0], setup["refine"]
    costs = [r["refined"]["refine_ms_per_image"] for r in conditions.values()
             if "refine_ms_per_image" in r.get("refined", {})]
    refinement = (f" The pass refined is the source model with its least confident {refine['percent']:g} % of pixels "
                  f"re-decided by {refine['iterations']} propagation steps over {refine['guide']} affinities, at "
                  f"{sum(costs) / len(costs):.0f} ms per image on average." if refine and costs else "")
    prior = (f", BatchNorm statistics mixed with the source's counted as {adaptation['bn_prior']:g} images"
             if adaptation.get("bn_prior") else "")
    page.heading("Test-time adaptation").paragraph(
        f"Data {setup['data']}, {setup['num_images']} images, batch {setup['batch_size']}; methods "
        f"{', '.join(a['method'] for a in setup['adaptations'])}, {adaptation['mode']} mode, {adaptation['optimizer']} "
        f"lr {adaptation['lr']:g}, {adaptation['steps']} step(s) per batch{prior}; each condition starts from the "
        f"source weights.{refinement} Corruptions seeded with {setup['seed']}. Values are percentages; the gain is the "
        "mean mIoU over all conditions minus the source's.")
    columns = ("clean_mIoU", "mean_corrupted_mIoU", "mean_mIoU", "mean_boundary_IoU", "mean_ECE")
    page.table(["pass", "clean mIoU", "mean corrupted mIoU", "mean mIoU", "mean Boundary IoU", "mean ECE", "gain",
                "resets"],
               [[which, *(percent(summary[which][k]) for k in columns), gain(summary["mIoU_gain"], which),
                 str(summary["resets"].get(which, "-"))] for which in passes])
    families = list(summary[passes[0]]["per_family_mIoU"])
    if families:
        page.heading("Per corruption family").table(
            ["pass", *(f"{f} mIoU" for f in families), *(f"{f} ECE" for f in families)],
            [[which, *(percent(summary[which]["per_family_mIoU"][f]) for f in families),
              *(percent(summary[which]["per_family_ECE"][f]) for f in families)] for which in passes])
    page.heading("Per condition").table(*condition_rows(conditions))
    resets = [[key, which, str(r["batch"]), r["reason"]] for key, results in conditions.items()
              for which, metrics in results.items() for r in metrics.get("adaptation", {}).get("reset_log", [])]
    if resets:
        page.heading("Safety resets").table(["condition", "method", "batch", "reason"], resets)


def gain(gains: dict[str, float], which: str) -> str:
    return percent(gains[which]) if which in gains else "-"


def dataset_section(run: RunFiles, page: Document, folder: Path) -> None:
    info = run.read("info.json")
    per_class = info["per_class"]
    page.heading("Dataset").paragraph(
        f"{info['data']}, split {info['split']}: {info['num_classes']} classes, ignore label {info['ignore_index']} "
        f"({info['ignored_pixels']} ignored pixels). Frequencies are shares of the labelled pixels.")
    page.table(["split", "images"], [[name, str(size)] for name, size in info["split_sizes"].items()])
    page.table(["class", "pixels", "frequency"], [[n, str(c), percent(f)] for n, c, f in
                                                  zip(per_class["name"], per_class["pixels"], per_class["frequency"])])
    plot = run.path / "class_frequencies.png"  # trustseg info draws it (log scale, the classes' colours)
    if not plot.is_file():
        plot = class_frequency_plot(per_class["name"], per_class["frequency"], folder)
    page.image(plot, "class frequencies")


def synthetic_data_section(run: RunFiles, page: Document, folder: Path) -> None:
    manifest = run.read("manifest.json")
    images, names = manifest["images"], manifest["class_names"]
    backend = manifest["backend"]
    page.heading("Synthetic data").paragraph(
        f"From {manifest['source']} ({manifest['split']}), checkpoint {manifest['checkpoint'] or 'none'}: selector "
        f"{manifest['selector']}, tau {manifest['tau']}, backend {backend.get('name', backend)}, seed {manifest['seed']}, "
        f"feather sigma {manifest['feather_sigma']}. Preserved: the share of pixels kept from the source image; "
        "labelled: the share that keeps a label (the feather and every generated pixel are ignore).")
    mean = (lambda key: sum(e[key] for e in images) / len(images)) if images else (lambda key: math.nan)
    page.table(["images", "mean preserved", "mean labelled"],
               [[str(len(images)), percent(mean("preserved_fraction")), percent(mean("labelled_fraction"))]])
    kept = Counter(name for e in images for name in e["preserved_class_names"])
    page.table(["class", "images preserving it"], [[name, str(kept[name])] for name in names if kept[name]])
    if run.has("preview.png"):
        page.image(run.path / "preview.png", "original | entropy | preserved | synthetic | label")


def class_frequency_plot(names: list[str], shares: list[float], folder: Path) -> Path:
    """Bar plot of each class's share (a fraction) of the labelled pixels."""
    return bar_plot(names, [100 * share for share in shares], folder / "class_frequency.png",
                    title="Class frequency", ylabel="% of labelled pixels")


def reliability_plot(tables: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Reliability diagrams of CalibrationHistogram ``reliability`` tables (bin edges, and counts,
    confidences, accuracies under ``all``), one panel per name."""

    return reliability_diagrams({name: {"lower": t["lower"], "upper": t["upper"], **t["all"]}
                                 for name, t in tables.items()}, path, title=title)


# file needed -> the section it enables, in page order
SECTIONS: dict[str, Callable[[RunFiles, Document, Path], None]] = {
    "robustness.json": robustness_section,  # a robustness run's headline; its metrics.json is the clean condition
    "metrics.json": metrics_section,
    CONFUSION_FILE: confusion_section,
    GALLERY_INDEX: gallery_section,
    PREDICTIONS_FILE: predictions_section,
    "history.jsonl": training_section,
    "calibration.json": calibration_section,
    "pos_embedding.json": resolution_section,
    "compression.json": compression_section,
    "adapt.json": adaptation_section,
    "info.json": dataset_section,
    "manifest.json": synthetic_data_section,
    "config.yaml": config_section,
}


def run_page(run: RunFiles, folder: Path) -> Document:
    """The page of one run, with a section for every file of `SECTIONS` present, figures in `folder`."""
    sections = [(file, section) for file, section in SECTIONS.items() if run.has(file)]
    if not sections:
        raise UserError(f"run directory {run.path}: holds none of {', '.join(SECTIONS)}; is it a trustseg run?")
    folder.mkdir(parents=True, exist_ok=True)
    config = run.read("config.yaml") if run.has("config.yaml") else {}
    command = config.get("command", "run") if isinstance(config, dict) else "run"
    page = Document(f"{command}: {run.name}")
    for file, section in sections:
        try:
            section(run, page, folder)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
            raise UserError(f"{run.path / file}: not as trustseg writes it ({type(error).__name__}: {error})") from None
    return page


def write_run_report(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html of the run in `run_dir` into `out` (default: the run directory)."""
    folder = Path(out if out is not None else run_dir)
    return run_page(RunFiles(run_dir), folder).write(folder)


def _value(value: Any) -> float:
    """A number read back from JSON, where null stands for NaN."""
    return math.nan if value is None else float(value)


def _finite(value: Any) -> float:
    return 0.0 if value is None or not math.isfinite(value) else float(value)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
