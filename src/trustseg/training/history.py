"""The record of a run: one dict per logged step ("train") or validation ("val").

The list travels inside every checkpoint, so a resumed run rewrites ``history.jsonl`` from the
checkpoint and continues it: the file never holds steps that the weights on disk have not seen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trustseg.report.plots import line_plot
from trustseg.engine.checkpoint import atomic_write
from trustseg.engine.rundir import to_plain

HISTORY_FILE = "history.jsonl"
LOSS_PLOT = "loss.png"
MIOU_PLOT = "val_miou.png"
ASG_PLOT = "asg.png"


class History:
    """Appends records in memory and, when given a run directory path, to ``history.jsonl``."""

    def __init__(self, records: list[dict[str, Any]] | None = None, run_dir: Path | None = None) -> None:
        self.records: list[dict[str, Any]] = list(records or [])
        self.path = None if run_dir is None else Path(run_dir) / HISTORY_FILE
        if self.path is not None:
            text = "".join(_line(record) for record in self.records)
            atomic_write(self.path, lambda handle: handle.write(text.encode()))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(_line(record))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def best(self) -> tuple[float, int]:
        """(best val mIoU, its step), (-inf, -1) before the first validation with a defined mIoU."""
        best, step = -math.inf, -1
        for record in self.of_kind("val"):
            value = record.get("mIoU")
            if value is not None and not math.isnan(value) and value > best:
                best, step = value, record["step"]
        return best, step

    def plot(self, run_dir: Path) -> list[Path]:
        """``loss.png`` (training loss per step), ``asg.png`` (ASG's position loss and error, when on) and
        ``val_miou.png`` (val mIoU per step), where there is data."""
        paths = []
        train = self.of_kind("train")
        if train:
            losses = [r["loss"] for r in train]
            series = {"train loss": ([r["step"] for r in train], losses)}
            paths.append(line_plot(series, Path(run_dir) / LOSS_PLOT, title="Training loss", xlabel="step",
                                   ylabel="loss", log_scale=min(losses) > 0))
        guided = [r for r in train if "asg_error_patches" in r]
        if guided:
            steps = [r["step"] for r in guided]
            series = {"position error (patches)": (steps, [r["asg_error_patches"] for r in guided]),
                      "position loss": (steps, [r["asg_loss"] for r in guided])}
            paths.append(line_plot(series, Path(run_dir) / ASG_PLOT, title="Active Spatial Guidance", xlabel="step",
                                   ylabel="value", log_scale=min(v for _, ys in series.values() for v in ys) > 0))
        val = [r for r in self.of_kind("val") if r.get("mIoU") is not None]
        if val:
            series = {"val mIoU": ([r["step"] for r in val], [r["mIoU"] for r in val])}
            paths.append(line_plot(series, Path(run_dir) / MIOU_PLOT, title="Validation mIoU", xlabel="step",
                                   ylabel="mIoU"))
        return paths


def _line(record: dict[str, Any]) -> str:
    return json.dumps(to_plain(record), allow_nan=False) + "\n"


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
