"""Comparing runs: Kendall's tau-b, rankings per metric, sentences where metrics disagree, and a
bootstrap confidence interval of the mIoU difference between two runs over images.

Every function here is pure (numbers in, numbers or text out); the pages that show them are built in
`trustseg.report.pages`.

Kendall's tau-b (Kendall 1945): with S = sum over pairs i < j of sign(x_i - x_j) * sign(y_i - y_j),
and n_x, n_y the numbers of pairs not tied in x, in y: tau_b = S / sqrt(n_x * n_y). Ties count in
neither concordant nor discordant pairs; it equals ``scipy.stats.kendalltau`` (variant "b").

The bootstrap (Efron & Tibshirani 1993, percentile interval) resamples *images* with replacement:
one resample draws N image indices, sums both runs' per-image confusion matrices over them, and takes
the difference of the two dataset-level mIoUs (mmsegmentation's convention, NaN-mean over classes).
The same indices are used for both runs (a paired bootstrap), so what differs between images cancels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trustseg.errors import UserError

# Which way is better, by metric name or name prefix. Everything else has no direction and is not ranked.
HIGHER_BETTER = ("aAcc", "mIoU", "mAcc", "mDice", "fwIoU", "mBIoU", "mIoU_img", "mPrecision", "mRecall",
                 "clean_mIoU", "mean_corrupted_mIoU", "relative_robustness")
LOWER_BETTER = ("ECE", "MCE", "aECE", "cwECE", "ECE_boundary", "MCE_boundary", "aECE_boundary", "cwECE_boundary",
                "ECE_img_mean", "NLL", "Brier", "mCE", "relative_mCE")
HIGHER_BETTER_PREFIXES = ("AUROC_",)
LOWER_BETTER_PREFIXES = ("AURC_", "EAURC_")

# The metrics that tables of Kendall's tau show (where present): one or two per aspect, not every variant.
HEADLINE = ("mIoU", "mAcc", "aAcc", "mBIoU", "ECE", "NLL", "Brier", "AUROC_msp", "mean_corrupted_mIoU",
            "relative_robustness", "mCE")

# What a metric says about a model, for the sentences (the first metric of each kind that is present).
ASPECTS = (
    ("the most accurate", ("mIoU",)),
    ("the best calibrated", ("ECE", "NLL")),
    ("the most robust", ("mean_corrupted_mIoU", "relative_robustness")),
    ("the best at flagging its own errors", ("AUROC_msp",)),
)


def direction(metric: str) -> int:
    """+1 if a higher value of `metric` is better, -1 if lower is better, 0 when it has no direction."""
    if metric in HIGHER_BETTER or metric.startswith(HIGHER_BETTER_PREFIXES):
        return 1
    if metric in LOWER_BETTER or metric.startswith(LOWER_BETTER_PREFIXES):
        return -1
    return 0


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences; pairs where either value is NaN are dropped first.

    NaN when fewer than two observations remain or when either sequence is constant. O(n^2) in time and
    memory, for the few runs or conditions a report compares.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise UserError(f"Kendall's tau needs two sequences of equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    upper = np.triu_indices(len(a), k=1)
    sign_a = np.sign(a[:, None] - a[None, :])[upper]
    sign_b = np.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = np.count_nonzero(sign_a), np.count_nonzero(sign_b)
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return float(np.sum(sign_a * sign_b) / math.sqrt(untied_a * untied_b))


def ranking(values: Mapping[str, float], metric: str) -> list[str]:
    """Run names best first for `metric` (its direction), NaN last; ties keep the given order."""
    sign = direction(metric)
    if sign == 0:
        raise UserError(f"metric {metric!r} has no known direction (higher or lower better); cannot rank by it")

    def key(name: str) -> tuple[bool, float]:
        value = values[name]
        missing = value is None or not math.isfinite(value)
        return missing, 0.0 if missing else -sign * value

    return sorted(values, key=key)


def ranking_text(values: dict[str, float], metric: str) -> str:
    """``a > b = c (no value: d)``: best first, equal values tied with ``=``, runs without the metric apart."""
    groups: list[list[str]] = []
    for name in ranking(values, metric):
        value = values[name]
        if not math.isfinite(value):
            break
        if groups and values[groups[-1][0]] == value:
            groups[-1].append(name)
        else:
            groups.append([name])
    missing = [name for name, value in values.items() if not math.isfinite(value)]
    text = " > ".join(" = ".join(group) for group in groups) or "-"
    return text + (f" (no value: {', '.join(missing)})" if missing else "")


def ranked_metrics(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The metrics with a direction that every run of `table` (run -> metric -> value) reports."""
    runs = list(table.values())
    if not runs:
        return []
    return [m for m in runs[0] if direction(m) and all(isinstance(r.get(m), (int, float)) for r in runs)]


def tau_matrix(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> np.ndarray:
    """Kendall's tau-b between every two `metrics` over the rows of `table` (row -> metric -> value),
    each metric oriented so that higher is better: a positive tau means the two metrics agree on which
    row is better. (M, M) float, NaN where undefined."""
    goodness = {m: [direction(m) * _number(row.get(m)) for row in table.values()] for m in metrics}
    return np.array([[kendall_tau_b(goodness[m], goodness[n]) for n in metrics] for m in metrics])


def disagreements(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Sentences naming where the best run differs by aspect: "run-a has the best mIoU, but run-b is
    the best calibrated (lowest ECE)". Empty when one run is best at everything measured."""
    reported = {m for row in table.values() for m, v in row.items() if math.isfinite(_number(v))}
    present = [(aspect, next((m for m in metrics if m in reported), None)) for aspect, metrics in ASPECTS]
    present = [(aspect, metric) for aspect, metric in present if metric is not None]
    if len(table) < 2 or len(present) < 2:
        return []
    best = {metric: ranking({run: _number(row.get(metric)) for run, row in table.items()}, metric)[0]
            for _, metric in present}
    (_, lead_metric), others = present[0], present[1:]
    leader = best[lead_metric]
    sentences = []
    for aspect, metric in others:
        if best[metric] != leader:
            word = "highest" if direction(metric) > 0 else "lowest"
            sentences.append(f"{leader} has the best {lead_metric}, but {best[metric]} is {aspect} ({word} {metric}).")
    return sentences


def opposed(taus: np.ndarray, metrics: Sequence[str], what: str, threshold: float = -0.3) -> list[str]:
    """Sentences for the metric pairs of a `tau_matrix` that order `what` in opposite ways (tau <= threshold)."""
    return [f"{metrics[i]} and {metrics[j]} order the {what} in opposite ways (tau = {taus[i, j]:+.2f}): "
            f"better by one is often worse by the other."
            for i in range(len(metrics)) for j in range(i + 1, len(metrics)) if taus[i, j] <= threshold]


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


# ----------------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapInterval:
    """The mIoU difference (a - b) on all images, and its percentile interval over the resamples."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    images: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def miou_of_confusions(confusions: torch.Tensor) -> torch.Tensor:
    """mIoU of (..., K, K) confusion counts (rows GT, columns prediction): the NaN-mean over classes of
    I / (G + P - I), so classes absent from both are left out. Returns (...) float64."""
    counts = confusions.double()
    inter = counts.diagonal(dim1=-2, dim2=-1)
    union = counts.sum(-1) + counts.sum(-2) - inter
    return (inter / union).nanmean(-1)


def resample_batches(images: int, resamples: int, seed: int, chunk: int = 64) -> Iterator[torch.Tensor]:
    """The bootstrap's image indices: `resamples` rows of `images` indices drawn with replacement,
    yielded as (<= chunk, images) int64 blocks from one CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, resamples, chunk):
        yield torch.randint(images, (min(chunk, resamples - start), images), generator=generator)


def bootstrap_miou_difference(confusions_a: torch.Tensor, confusions_b: torch.Tensor, *, resamples: int = 1000,
                              confidence: float = 0.95, seed: int = 0, chunk: int = 64) -> BootstrapInterval:
    """Paired percentile bootstrap of mIoU(a) - mIoU(b) over images.

    `confusions_a`, `confusions_b`: (N, K, K) per-image confusion counts of two runs on the same N
    images in the same order. Each block of `chunk` resamples is turned into counts per image (chunk, N)
    and multiplied into the flattened matrices (N, K*K) in float64 (exact for counts below 2^53), so the
    working memory is chunk * (N + 2 K^2) numbers on top of the inputs' N * K^2 each.
    """
    if confusions_a.shape != confusions_b.shape or confusions_a.dim() != 3 or confusions_a.shape[1] != confusions_a.shape[2]:
        raise UserError(f"per-image confusion matrices must both be (N, K, K) of one shape, got "
                        f"{tuple(confusions_a.shape)} and {tuple(confusions_b.shape)}")
    if not 0 < confidence < 1:
        raise UserError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise UserError(f"resamples must be >= 1, got {resamples}")
    images, k = confusions_a.shape[0], confusions_a.shape[1]
    if images == 0:
        raise UserError("the bootstrap needs at least one image")
    flat_a = confusions_a.reshape(images, k * k).double()
    flat_b = confusions_b.reshape(images, k * k).double()
    differences = []
    for indices in resample_batches(images, resamples, seed, chunk):
        weights = torch.zeros(indices.shape[0], images, dtype=torch.float64)
        weights.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float64))
        a = miou_of_confusions((weights @ flat_a).view(-1, k, k))
        b = miou_of_confusions((weights @ flat_b).view(-1, k, k))
        differences.append(a - b)
    spread = torch.cat(differences).numpy()
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(spread, [tail, 100 - tail]) if np.isfinite(spread).any() else (math.nan, math.nan)
    full = float(miou_of_confusions(flat_a.sum(0).view(k, k)) - miou_of_confusions(flat_b.sum(0).view(k, k)))
    return BootstrapInterval(difference=full, low=float(low), high=float(high), confidence=confidence,
                             resamples=resamples, images=images)
