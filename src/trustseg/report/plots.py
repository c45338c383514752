"""PNG plots with matplotlib's non-interactive backend (no display on these machines)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trustseg.engine.checkpoint import atomic_write  # noqa: E402


def save_figure(figure, path: str | Path) -> Path:
    """Write `figure` as a PNG atomically (a failed write keeps the previous plot) and close it."""
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    finally:
        plt.close(figure)
    return Path(path)


def bar_plot(
    labels: Sequence[str],
    values: Sequence[float],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    colors: Sequence[tuple[float, float, float]] | None = None,
    log_scale: bool = False,
) -> Path:
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 1.5), 3.6), dpi=120)
    axes.bar(range(len(values)), values, color=colors, edgecolor="black", linewidth=0.5)
    axes.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if log_scale:
        axes.set_yscale("log")
    figure.tight_layout()
    return save_figure(figure, path)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_scale: bool = False,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One line per ``name: (xs, ys)`` (e.g. a training curve per step), with a legend when several;
    ``errors[name]`` adds error bars of those half-heights (e.g. the standard deviation over seeds)."""
    figure, axes = plt.subplots(figsize=(6.0, 3.6), dpi=120)
    for name, (xs, ys) in series.items():
        axes.errorbar(xs, ys, yerr=(errors or {}).get(name), label=name, linewidth=1.2, capsize=3,
                      marker="o" if len(xs) <= 20 else None, markersize=3)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if log_scale:
        axes.set_yscale("log")
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    path: str | Path,
    *,
    title: str,
    colorbar_label: str,
    percent: bool = True,
) -> Path:
    """A labelled grid (e.g. corruption x severity) with each cell's value written in it; NaN cells blank."""
    import numpy as np

    grid = np.array(values, dtype=float)
    # room for the row labels, the colour bar and the title however few the columns
    width = max(5.0, 2.5 + 0.75 * len(column_labels))
    figure, axes = plt.subplots(figsize=(width, 1.0 + 0.32 * len(row_labels)), dpi=120)
    image = axes.imshow(100 * grid if percent else grid, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(column_labels)), column_labels, fontsize=8)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    low, high = np.nanmin(grid), np.nanmax(grid)
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            shade = "black" if value > (low + high) / 2 else "white"
            axes.text(j, i, f"{100 * value:.1f}" if percent else f"{value:.3g}", ha="center", va="center",
                      fontsize=7, color=shade)
    figure.colorbar(image, ax=axes, label=colorbar_label)
    axes.set_title(title)
    figure.tight_layout()
    return save_figure(figure, path)


def reliability_diagrams(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, title: str) -> Path:
    """One reliability diagram per ``name: reliability`` (CalibrationHistogram's ``reliability["all"]``
    with ``lower``/``upper`` bin edges): accuracy per confidence bin against the diagonal, gaps shaded,
    the share of pixels per bin as a thin bar underneath."""
    import numpy as np

    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.0 * rows), dpi=110, squeeze=False)
    for axes, (name, data) in zip(grid.flat, panels.items()):
        lower, upper = np.array(data["lower"][:-1]), np.array(data["upper"][:-1])  # the last bin is {1.0}
        accuracy = np.nan_to_num(np.array(data["accuracy"][:-1], dtype=float))
        confidence = np.array(data["confidence"][:-1], dtype=float)
        share = np.array(data["count"][:-1], dtype=float) / max(sum(data["count"]), 1)
        width, middle = upper - lower, (lower + upper) / 2
        axes.bar(middle, accuracy, width=width, color="#4c72b0", edgecolor="black", linewidth=0.4, label="accuracy")
        axes.bar(middle, np.nan_to_num(confidence) - accuracy, bottom=accuracy, width=width, color="#dd8452",
                 alpha=0.45, edgecolor="#dd8452", linewidth=0.4, label="gap to confidence")
        axes.bar(middle, 0.25 * share / max(share.max(), 1e-12), width=0.6 * width, color="black", alpha=0.35)
        axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=0.8)
        axes.set(xlim=(0, 1), ylim=(0, 1), title=name, xlabel="confidence", ylabel="accuracy")
    for axes in list(grid.flat)[len(panels):]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path)
