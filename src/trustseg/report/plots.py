"""PNG plots with matplotlib's non-interactive backend (no display on these machines)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
