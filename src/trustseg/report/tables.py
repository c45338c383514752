"""Metric tables in two renderings from one set of rows: rich (terminal) and Markdown (reports)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich.table import Table

SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mDice", "fwIoU", "mBIoU", "mIoU_img")
# calibration (fractions except NLL and Brier) and error detection by uncertainty (prefixes + measure)
CALIBRATION_KEYS = ("ECE", "MCE", "aECE", "cwECE", "ECE_boundary", "NLL", "Brier")
UNCERTAINTY_PREFIXES = ("AUROC_", "AURC_", "EAURC_")
UNSCALED = ("NLL", "Brier")
PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "BIoU")


def percent(value: Any) -> str:
    """Fractions are shown as percentages with two decimals (mmsegmentation's convention)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    return f"{100 * value:.2f}"


def summary_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [k for k in SUMMARY_KEYS if k in metrics]
    return keys, [[percent(metrics[k]) for k in keys]]


def calibration_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Calibration and uncertainty keys present in `metrics`; empty when there are none."""
    keys = [k for k in CALIBRATION_KEYS if k in metrics]
    keys += [k for k in metrics if k.startswith(UNCERTAINTY_PREFIXES)]
    return keys, [[f"{metrics[k]:.4f}" if k in UNSCALED else percent(metrics[k]) for k in keys]] if keys else []


def per_class_rows(metrics: dict[str, Any], class_names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    per_class = metrics.get("per_class", {})
    keys = [k for k in PER_CLASS_KEYS if k in per_class]
    rows = [[name] + [percent(per_class[k][i]) for k in keys] for i, name in enumerate(class_names)]
    return ["class"] + keys, rows


def rich_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> Table:
    """A terminal table that never cuts a value: each column is at least as wide as its longest cell and
    its header's longest word (headers wrap between words). The first column (class or method names)
    never wraps. On a narrow terminal the table runs wider than the terminal instead of truncating."""
    table = Table(title=title)
    for i, name in enumerate(header):
        width = max([len(str(row[i])) for row in rows if i < len(row)] + [len(word) for word in str(name).split()] + [1])
        table.add_column(name, justify="left" if i == 0 and name == "class" else "right", no_wrap=i == 0,
                         min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

