"""Calibration that should hold under corruption: what the calibrators are fitted on, which conditions
they may be judged on, and which decision-preserving method wins each condition.

Tomani et al. ("Post-hoc Uncertainty Calibration for Domain Drift Scenarios", CVPR 2021) fit calibrators
on perturbed copies of the validation set at mixed levels, clean included, and judge them on
perturbations they never saw. Here each fit image gets one condition (clean or one of the
`--fit-corruptions` at one of the `--fit-severities`, each level equally likely; `MixedCorruptionDataset`),
drawn from the seed and the image's index, and the evaluation corruptions must be disjoint from the fit
ones unless `allow_overlap` says the overlap is meant. Nothing but the fit data is read to fit.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from trustseg.data.base import SegmentationDataset
from trustseg.errors import UserError
from trustseg.robustness.dataset import MixedCorruptionDataset

UNCALIBRATED = "uncalibrated"
BEST_BY = "ECE"


def check_unseen(fit_corruptions: tuple[str, ...], corruptions: tuple[str, ...], allow_overlap: bool) -> None:
    """Refuse evaluation corruptions the calibrators were fitted on (unless `allow_overlap`)."""
    shared = [name for name in corruptions if name in fit_corruptions]
    if shared and not allow_overlap:
        raise UserError(f"--fit-corruptions and --corruptions share {', '.join(shared)}: calibration under shift is "
                        "judged on corruptions the calibrators were not fitted on; drop them from one side or pass "
                        "--allow-overlap")


def fit_view(dataset: SegmentationDataset, corruptions: tuple[str, ...], severities: tuple[int, ...],
             seed: int) -> SegmentationDataset:
    """The fit data as the calibrators see it: unchanged without `corruptions`, else each image under its
    own drawn condition."""
    return MixedCorruptionDataset(dataset, corruptions, severities, seed) if corruptions else dataset


def fit_conditions(dataset: SegmentationDataset) -> dict[str, int]:
    """How many fit images were drawn for each condition (all clean without fit corruptions)."""
    source = dataset.dataset if hasattr(dataset, "indices") else dataset  # a subset of the fit view
    indices = getattr(dataset, "indices", range(len(dataset)))
    if not isinstance(source, MixedCorruptionDataset):
        return {"clean": len(dataset)}
    return dict(sorted(Counter(source.condition(int(i)) for i in indices).items()))


def best_decision_preserving(methods: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]]
                             ) -> dict[str, Any]:
    """Among the methods that keep every pixel's decision (measured argmax preservation) and the
    uncalibrated model (which keeps it trivially), the one with the lowest ECE on one condition's
    `results` (method -> metrics); NaN ECE never wins."""
    candidates = [name for name in results
                  if name == UNCALIBRATED or methods[name]["properties"]["argmax_preserving"]]
    best = min(candidates, key=lambda name: _finite(results[name][BEST_BY]))
    return {"method": best, BEST_BY: results[best][BEST_BY], "uncalibrated_" + BEST_BY: results[UNCALIBRATED][BEST_BY],
            "candidates": candidates}


def _finite(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value
