"""How well uncertainty flags errors, from fixed-size histograms: AUROC, AURC and E-AURC per measure.

Every labelled pixel is one sample, "wrong" meaning argmax != target; pixels whose target is
`ignore_index` count nowhere. For each uncertainty measure (`trustseg.engine.uncertainty_maps.UNCERTAINTY`:
entropy, msp, margin, from the batch's softmax; or `MC_MEASURES`: mc-dropout, mutual-information,
maps the batch's `Predictions.maps` carry; each in [0, 1]) the state is two histograms over the same bins, of correct and
of wrong pixels, so memory does not grow with the number of pixels and no pixel is subsampled
(torch-uncertainty keeps 1% of the pixels, torchmetrics' BinaryAUROC keeps all of them).

- **Bins**: the union of `num_bins` + 1 equal-width edges on [0, 1] and `num_bins` + 1 log-spaced
  edges on [1e-12, 1], i.e. 2 x `num_bins` bins (4096 by default), [e_i, e_(i+1)), the last one
  closed. Equal-width bins alone would put every pixel with confidence above 1 - 1/num_bins into one
  bin, and that is most pixels of a good segmenter; the log-spaced edges resolve them down to 1e-12
  (a float32 msp is 0 or at least 2^-24 ~ 6e-8; entropy goes lower). Every bin is at most 1/num_bins
  wide and, above 1e-12, its upper edge is at most 10^(12/num_bins) times its lower one (+1.36% at
  2048). Values below 1e-12 share the first bin. AUROC and AURC depend only on the ranking of the
  pixels, so unequal bins bias nothing; they only decide which pixels may be tied.
- **AUROC** of uncertainty as a score for "pixel is wrong": P(u_wrong > u_correct) + P(u_wrong =
  u_correct) / 2 over all (wrong, correct) pairs, pairs in one bin counted as ties. That is exact
  when the values in each bin are equal (ties get half credit, as the trapezoidal ROC area does), and
  otherwise only same-bin pairs can differ, by at most 1/2 each:
  |AUROC - exact| <= sum_b c_b w_b / (2 C W), reported in ``histogram_error``. NaN without a wrong
  or without a correct pixel.
- **AURC**, area under the risk-coverage curve (Geifman & El-Yaniv 2017; Geifman et al. 2019): rank
  the N pixels by increasing uncertainty; the risk at coverage i/N is the error rate of the first i;
  AURC = (1/N) sum_i risk_i. Within a bin the order is unknown, so AURC is its expected value over a
  uniformly random order inside each bin (exact for tied values, the counterpart of AUROC's half
  credit): the first j of a bin of n pixels, w wrong, after S pixels with A wrong hold j w / n
  errors on average, so the bin adds sum_{j=1..n} (A + j w/n) / (S + j) = (A - S w/n)(H_{S+n} - H_S)
  + w, with H the harmonic numbers. Whatever the order inside bin b, the errors among its first j
  pixels stay within a range of width min(c_b, w_b), so |AURC - exact| <= (1/N) sum_b min(c_b, w_b)
  (H_{S_b+n_b} - H_{S_b}), also in ``histogram_error``. The factor is about ln n_b for the first
  bin (S = 0), so a first bin that mixes correct and wrong pixels dominates this bound.
- **E-AURC** = AURC - AURC of a perfect ranking (all correct pixels first), whose exact value is
  (W - C (H_N - H_C)) / N (Geifman et al. 2019 use its continuous approximation r + (1-r) ln(1-r)).
  It is >= 0 and removes the part of AURC that only reflects the error rate r.

Keys: ``AUROC_<measure>``, ``AURC_<measure>``, ``EAURC_<measure>`` (AURC and E-AURC NaN when no
pixel counts; higher AUROC and lower AURC / E-AURC are better), and ``histogram_error`` mapping
``AUROC_<measure>`` and ``AURC_<measure>`` to the bounds above (the AURC bound also bounds E-AURC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from trustseg.errors import UserError
from trustseg.metrics.base import Accumulator, Predictions, invalid_labels_error
from trustseg.engine.uncertainty_maps import SCORED_MEASURES, UNCERTAINTY

LOG_FLOOR = 1e-12


def uncertainty_bin_edges(num_bins: int) -> Tensor:
    """Sorted bin edges (float64) on [0, 1]: equal-width and log-spaced edges together (module doc)."""
    uniform = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    log_spaced = torch.logspace(math.log10(LOG_FLOOR), 0, num_bins + 1, dtype=torch.float64)
    return torch.unique(torch.cat((uniform, log_spaced)))


def _harmonic_gap(start: Tensor, count: Tensor) -> Tensor:
    """H_{start+count} - H_start = sum_{j=1..count} 1 / (start + j), float64 (H_n = digamma(n+1) + gamma)."""
    return torch.special.digamma(start + count + 1) - torch.special.digamma(start + 1)


def error_auroc(correct: Tensor, wrong: Tensor) -> tuple[float, float]:
    """AUROC of uncertainty for detecting errors, and its bound, from counts per bin in ascending order."""
    c, w = correct.double(), wrong.double()
    pairs = c.sum() * w.sum()
    if pairs == 0:
        return math.nan, math.nan
    below = torch.cumsum(c, 0) - c
    return float((w * (below + c / 2)).sum() / pairs), float((w * c).sum() / (2 * pairs))


def risk_coverage(correct: Tensor, wrong: Tensor) -> tuple[float, float, float]:
    """AURC, the AURC of a perfect ranking, and the bound on |AURC - exact|, from counts per bin."""
    c, w = correct.double(), wrong.double()
    n = c + w
    total = n.sum()
    if total == 0:
        return math.nan, math.nan, math.nan
    before = torch.cumsum(n, 0) - n
    errors_before = torch.cumsum(w, 0) - w
    harmonic = _harmonic_gap(before, n)
    rate = torch.where(n > 0, w / n, 0.0)
    aurc = ((errors_before - before * rate) * harmonic + w).sum() / total
    bound = (torch.minimum(c, w) * harmonic).sum() / total
    optimal = (w.sum() - c.sum() * _harmonic_gap(c.sum(), w.sum())) / total
    return float(aurc), float(optimal), float(bound)


class UncertaintyHistogram(Accumulator):
    """AUROC, AURC and E-AURC of each uncertainty measure in `measures` over all labelled pixels.

    See the module docstring for the definitions. Reads the batch's shared `Predictions.probs` and
    `.pred` (so it needs logits; hard predictions raise `UserError`). State: int64 counts
    (measures, 2, bins), correct pixels in row 0 and wrong ones in row 1.

    >>> metric = UncertaintyHistogram(num_classes=2)
    >>> logits = torch.tensor([[[[3.0, 1.0, 0.0]], [[0.0, 0.0, 2.0]]]])  # msp 0.047, 0.269, 0.119
    >>> metric.update(logits, torch.tensor([[[0, 1, 1]]]))  # the middle pixel is wrong
    >>> metric.compute()["AUROC_msp"]
    1.0
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        measures: Sequence[str] = ("msp",),
        num_bins: int = 2048,
    ) -> None:
        super().__init__(num_classes, ignore_index)
        measures = (measures,) if isinstance(measures, str) else tuple(measures)
        unknown = [m for m in measures if m not in SCORED_MEASURES]
        if not measures or unknown or len(set(measures)) != len(measures):
            raise UserError(
                f"uncertainty measures {list(measures)}: expected distinct names from {', '.join(SCORED_MEASURES)}"
            )
        if not isinstance(num_bins, int) or num_bins < 1:
            raise UserError(f"num_bins must be a positive integer, got {num_bins!r}")
        self.measures, self.num_bins = measures, num_bins
        # interior edges: bucketize(u, inner, right=True) is the bin of u, values past either end included
        self._inner = uncertainty_bin_edges(num_bins)[1:-1]
        self._add_state("hist", (len(measures), 2, len(self._inner) + 1), torch.int64)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "measures": self.measures, "num_bins": self.num_bins}

    def _update(self, preds: Predictions, target: Tensor) -> None:
        probs = preds.probs  # raises UserError for hard predictions
        if target.numel() == 0:
            return
        K, bins = self.num_classes, len(self._inner) + 1
        # row offset of each pixel: 0 correct, bins wrong, 2 x bins ignored (a slot dropped below)
        row = (preds.pred != target).long() * bins
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= K:
            ignored = target == self.ignore_index
            if bool((((target < 0) | (target >= K)) & ~ignored).any()):
                raise invalid_labels_error(target, K, self.ignore_index)
            row.masked_fill_(ignored, 2 * bins)
        inner = self._inner.to(device=probs.device, dtype=probs.dtype)
        counts = [
            torch.bincount(
                (torch.bucketize(self._map(name, preds, probs), inner, right=True) + row).flatten(), minlength=3 * bins
            )[: 2 * bins].view(2, bins)
            for name in self.measures
        ]
        self._accumulate("hist", torch.stack(counts))

    @staticmethod
    def _map(name: str, preds: Predictions, probs: Tensor) -> Tensor:
        if name in UNCERTAINTY:
            return UNCERTAINTY[name](probs)
        if name not in preds.maps:
            raise UserError(f"uncertainty measure {name!r} needs MC-dropout passes: evaluate with --uncertainty {name}")
        found = preds.maps[name]
        if found.shape != preds.pred.shape:
            raise UserError(f"uncertainty map {name!r} has shape {tuple(found.shape)}, expected {tuple(preds.pred.shape)}")
        return found.to(probs.dtype)

    def compute(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        errors: dict[str, float] = {}
        for name, (correct, wrong) in zip(self.measures, self._states["hist"]):
            auroc, auroc_bound = error_auroc(correct, wrong)
            aurc, optimal, aurc_bound = risk_coverage(correct, wrong)
            results.update({f"AUROC_{name}": auroc, f"AURC_{name}": aurc, f"EAURC_{name}": aurc - optimal})
            errors.update({f"AUROC_{name}": auroc_bound, f"AURC_{name}": aurc_bound})
        results["histogram_error"] = errors
        return results
