"""Calibration that should hold under corruption: what the calibrators are fitted on, which conditions
they may be judged on, and which decision-preserving method wins each condition.

Tomani et al. ("Post-hoc Uncertainty Calibration for Domain Drift Scenarios", CVPR 2021) fit calibrators
on perturbed copies of the validation set at mixed levels, clean included, and judge them on
perturbations they never saw. Here each fit image gets one condition (clean or one of the
`--fit-corruptions` at one of the `--fit-severities`, each level equally likely; `MixedCorruptionDataset`),
drawn from the seed and the image's index, and the evaluation corruptions must be disjoint from the fit
ones unless `allow_overlap` says the overlap is meant. Nothing but the fit data is read to fit.

Leave one family out (`lofo_plan`): for each corruption family among the evaluation corruptions, the
calibrators are fitted on the fit corruptions of the other families only and evaluated on the held-out
family, next to calibrators fitted on clean data: whether corruption-fitting helps on a kind of shift it
has never seen.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from trustseg.data.base import SegmentationDataset
from trustseg.errors import UserError
from trustseg.robustness.corruptions import FAMILIES, family_of
from trustseg.robustness.dataset import MixedCorruptionDataset
from trustseg.robustness.summary import condition_key

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


def lofo_plan(fit_corruptions: tuple[str, ...], corruptions: tuple[str, ...], severities: tuple[int, ...]
              ) -> dict[str, dict[str, list[str]]]:
    """{held-out family: {"fit_corruptions": the fit corruptions of the other families, "conditions": the
    evaluation conditions of this family}}, families in their usual order."""
    if not fit_corruptions or not corruptions:
        raise UserError("--leave-one-family-out needs --fit-corruptions and --corruptions (e.g. both all)")
    plan = {}
    for family in (f for f in FAMILIES if any(family_of(name) == f for name in corruptions)):
        others = [name for name in fit_corruptions if family_of(name) != family]
        if not others:
            raise UserError(f"--leave-one-family-out: every --fit-corruptions is a {family} corruption, so nothing is "
                            f"left to fit on when {family} is held out; add fit corruptions of other families")
        held = [condition_key(name, s) for name in corruptions if family_of(name) == family for s in severities]
        plan[family] = {"fit_corruptions": others, "conditions": held}
    return plan


def lofo_rows(conditions: dict[str, dict[str, Any]], lofo: dict[str, dict[str, Any]]
              ) -> tuple[list[str], list[list[str]]]:
    """One row per held-out condition and method: ECE fitted on clean data vs fitted without the family."""
    header = ["condition", "method", "ECE clean-fitted", "ECE fitted w/o family", "Δ ECE (pp)", "mIoU Δ"]
    rows = []
    for family, entry in lofo.items():
        for key, results in entry["conditions"].items():
            for name, shifted in results.items():
                clean_fit = conditions[key][name]
                rows.append([key, name, f"{100 * clean_fit['ECE']:.2f}", f"{100 * shifted['ECE']:.2f}",
                             f"{100 * (shifted['ECE'] - clean_fit['ECE']):+.2f}", f"{100 * shifted['delta_mIoU']:+.2f}"])
    return header, rows


def _finite(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value
