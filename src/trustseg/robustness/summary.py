"""Robustness summaries from per-condition mIoU: relative robustness and corruption errors.

Corruption error follows Hendrycks & Dietterich (ICLR 2019) with segmentation's error 1 - mIoU and a
baseline run in place of AlexNet (as Kamann & Rother's corruption degradation does):
    CE_c  = sum_s (1 - mIoU_{s,c}) / sum_s (1 - mIoU^base_{s,c})
    rCE_c = sum_s (mIoU_clean - mIoU_{s,c}) / sum_s (mIoU^base_clean - mIoU^base_{s,c})
mCE and relative mCE are the means over corruptions. Relative robustness = mIoU_corrupted / mIoU_clean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trustseg.robustness.corruptions import FAMILIES

CLEAN = "clean"


def condition_key(name: str, severity: int) -> str:
    return f"{name}/{severity}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def miou_grid(conditions: Mapping[str, Mapping[str, Any]], corruptions: Sequence[str],
              severities: Sequence[int]) -> dict[str, list[float]]:
    """corruption -> [mIoU at each severity] from the per-condition metrics."""
    return {name: [conditions[condition_key(name, s)]["mIoU"] for s in severities] for name in corruptions}


def summarize(conditions: Mapping[str, Mapping[str, Any]], corruptions: Sequence[str], severities: Sequence[int],
              baseline: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Clean mIoU, mean corrupted mIoU (overall, per corruption, per family), relative robustness,
    and, given a baseline's conditions, CE / rCE per corruption and mCE / relative mCE."""
    clean = conditions[CLEAN]["mIoU"]
    grid = miou_grid(conditions, corruptions, severities)
    per_corruption: dict[str, dict[str, float]] = {}
    for name, mious in grid.items():
        mean = _mean(mious)
        entry = {"mIoU": mean, "relative_robustness": _ratio(mean, clean)}
        if baseline is not None:
            base_clean = baseline[CLEAN]["mIoU"]
            base = [baseline[condition_key(name, s)]["mIoU"] for s in severities]
            entry["CE"] = _ratio(sum(1 - m for m in mious), sum(1 - b for b in base))
            entry["rCE"] = _ratio(sum(clean - m for m in mious), sum(base_clean - b for b in base))
        per_corruption[name] = entry
    per_family = {
        family: _mean([per_corruption[n]["mIoU"] for n in names if n in per_corruption])
        for family, names in FAMILIES.items() if any(n in per_corruption for n in names)
    }
    mean_corrupted = _mean([m for mious in grid.values() for m in mious])
    summary: dict[str, Any] = {
        "clean_mIoU": clean,
        "mean_corrupted_mIoU": mean_corrupted,
        "relative_robustness": _ratio(mean_corrupted, clean),
        "per_family_mIoU": per_family,
        "per_corruption": per_corruption,
        "worst": sorted(per_corruption, key=lambda n: (math.isnan(per_corruption[n]["mIoU"]), per_corruption[n]["mIoU"]))[:3],
    }
    if baseline is not None:
        summary["mCE"] = _mean([e["CE"] for e in per_corruption.values()])
        summary["relative_mCE"] = _mean([e["rCE"] for e in per_corruption.values()])
    return summary

