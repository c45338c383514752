"""Pixel calibration metrics from fixed-size histograms: ECE, MCE, adaptive ECE, class-wise ECE, NLL, Brier.

Every labelled pixel is one sample; pixels whose target is `ignore_index` count nowhere. The state is
a set of histograms of sums over confidence bins, so memory does not grow with the number of pixels
(torchmetrics keeps every confidence) and no pixels are subsampled (torch-uncertainty keeps 1%).

Definitions (M = `num_bins`, N = labelled pixels, conf = top-label probability max_k p_k, correct =
argmax == target):

- **Bins**: torchmetrics' ``MulticlassCalibrationError`` convention, ``bucketize(x, linspace(0, 1, M+1),
  right=True) - 1``: bin b holds [b/M, (b+1)/M) for b < M, and bin M holds exactly x = 1.0. That last,
  zero-width bin is kept because float32 softmax saturates to 1.0 on many pixels of a confident
  model; folding them into [(M-1)/M, 1) would change ECE and break agreement with torchmetrics.
- **ECE** (Guo et al. 2017) = sum_b (n_b/N) |acc_b - conf_b|; **MCE** = max over non-empty bins.
- **aECE**, adaptive / equal-mass ECE (Nixon et al. 2019): M groups of about N/M pixels in confidence
  order. It is derived from a fine equal-width histogram (`fine_bins` = F bins [j/F, (j+1)/F) with
  j = floor(F * conf), plus {1.0}); fine bin j joins group floor(M * C_j / N), C_j = pixels in fine
  bins below j. This is an *approximation*: only pixels of the at most M-1 fine bins that straddle an
  exact group boundary can land in another group, and moving a pixel changes the sum by at most
  2/N, so |aECE - exact| <= 2 * (fraction of pixels in those straddling fine bins). For a confidence
  density f that is about 2 (M-1) f / F: it shrinks with the fine bin width 1/F, but a heavy tie
  (saturated confidences all at 1.0) keeps it large, and then equal-mass bins are ill-defined anyway.
- **cwECE**, class-wise ECE = SCE of Nixon et al. 2019: per class k, the M-bin histogram of p_k over
  all labelled pixels against the frequency of target == k in each bin, ECE_k = sum_b |hits_kb -
  sum p_k| / N, averaged over all K classes (per-class values in ``per_class["cwECE"]``). Not the
  LTS repo's SCE, which bins per *predicted* class and sums.
- **NLL** = mean -log max(p_target, 1e-12): the clamp caps a pixel at 27.6 nats, because float32
  softmax underflows to exactly 0 for confidently wrong pixels and one such pixel would make the mean
  infinite. Exact wherever p_target >= 1e-12. Probabilities are never recomputed from logits.
- **Brier** = mean sum_k (p_k - 1[y = k])^2, the original multi-class score (Brier 1950), in [0, 2];
  not the one-vs-rest binary form.
- **Boundary band** (keys ending ``_boundary``): labelled pixels with a labelled pixel of another
  class within chessboard (L-inf) distance `boundary_width`. Ignored pixels and the image border are
  not class edges. All metrics above are also reported over the band.
- **Per-image ECE** (``ECE_img_mean``, ``ECE_img_std``): ECE of each image's own histogram, then the
  mean and the population standard deviation (ddof = 0) over images with at least one labelled
  (resp. band) pixel, the LTS reporting convention.

All values are fractions (NaN where no pixel counts); ``reliability`` holds per-bin count, mean
confidence and accuracy (NaN for an empty bin) for all labelled pixels and for the band.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from trustseg.errors import UserError
from trustseg.metrics.base import Accumulator, Predictions, invalid_labels_error
from trustseg.metrics.boundary import sliding_max

NLL_MIN_PROB = 1e-12
# Pixel regions, used as bincount offsets: interior, boundary band, ignored (dropped).
_REGIONS = 3
# Slack over float32 softmax rounding (the K probabilities sum to 1 within ~K ulp) in the
# "top probability > 1 - first edge puts every other class in bin 0" shortcut.
_TOP_MARGIN = 1e-3


def _bin_index(x: Tensor, edges: Tensor) -> Tensor:
    """Equal-width bin of each value in [0, 1]: b with edges[b] <= x < edges[b+1], and M for x = 1."""
    return torch.bucketize(x, edges, right=True).sub_(1)


def _fine_index(x: Tensor, fine_bins: int) -> Tensor:
    """floor(F * x) in x's precision: fine bins [j/F, (j+1)/F), and F for x = 1 (monotone in x)."""
    return (x * fine_bins).long().clamp_(0, fine_bins)


def class_edge_band(target: Tensor, ignored: Tensor, num_classes: int, width: int) -> Tensor:
    """(B, H, W) bool: labelled pixels with a labelled pixel of another class within L-inf `width`.

    `target` holds class indices in [0, K) wherever `ignored` is False. One pair of sliding maxima:
    of t+1 (the window's max label + 1) and of K-t (K minus its min label), ignored pixels and the
    padding being 0, so neither counts as an edge; the window is mixed iff max label != min label.
    """
    K = num_classes
    dtype = torch.uint8 if K <= 255 else torch.int32
    t = target.to(dtype)
    up = torch.where(ignored, 0, t + 1).to(dtype)
    down = torch.where(ignored, 0, K - t).to(dtype)
    both = torch.nn.functional.pad(torch.stack((up, down)), (width, width, width, width))
    window = 2 * width + 1
    both = sliding_max(sliding_max(both, window, -1), window, -2)
    mixed = both[0].to(torch.int32) + both[1].to(torch.int32) != K + 1
    return mixed & ~ignored


def _ece(correct: Tensor, conf: Tensor, count: Tensor) -> Tensor:
    """sum_b |sum correct - sum conf| / N over the last dim (float64), NaN where N = 0."""
    return (correct.double() - conf).abs().sum(-1) / count.sum(-1).double()


def _adaptive_ece(count: Tensor, conf: Tensor, correct: Tensor, groups: int) -> float:
    total = int(count.sum())
    if total == 0:
        return float("nan")
    before = torch.cumsum(count, 0) - count
    group = torch.div(before * groups, total, rounding_mode="floor").clamp_(max=groups - 1)
    gap = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, correct.double() - conf)
    return float(gap.abs().sum() / total)


class CalibrationHistogram(Accumulator):
    """Calibration of the softmax probabilities over all labelled pixels and a class-boundary band.

    See the module docstring for the definitions. Reads the batch's shared `Predictions.probs` (so it
    needs logits; hard predictions raise `UserError`). State, float64 sums and int64 counts: for two
    regions (interior, band), top-label histograms of M+1 and F+1 bins, K class-wise histograms of
    M+1 bins, NLL and Brier sums, and per-image ECE sums and sums of squares.

    >>> metric = CalibrationHistogram(num_classes=2)
    >>> metric.update(torch.tensor([[[[2.0]], [[0.0]]]]), torch.tensor([[[0]]]))
    >>> round(metric.compute()["ECE"], 4)  # one pixel, confidence 0.8808, correct
    0.1192
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        num_bins: int = 15,
        fine_bins: int = 1000,
        boundary_width: int = 5,
    ) -> None:
        super().__init__(num_classes, ignore_index)
        for name, value in (
            ("num_bins", num_bins),
            ("fine_bins", fine_bins),
            ("boundary_width", boundary_width),
        ):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        self.num_bins, self.fine_bins, self.boundary_width = (
            num_bins,
            fine_bins,
            boundary_width,
        )
        K, M, F = num_classes, num_bins + 1, fine_bins + 1
        for name, shape, dtype in (
            ("count", (2, M), torch.int64),
            ("conf", (2, M), torch.float64),
            ("correct", (2, M), torch.int64),
            ("fine_count", (2, F), torch.int64),
            ("fine_conf", (2, F), torch.float64),
            ("fine_correct", (2, F), torch.int64),
            ("class_count", (2, K, M), torch.int64),
            ("class_prob", (2, K, M), torch.float64),
            ("class_hits", (2, K, M), torch.int64),
            ("nll", (2,), torch.float64),
            ("brier", (2,), torch.float64),
            # per region kind (all, band): images, sum of per-image ECE, sum of its squares
            ("image_ece", (2, 3), torch.float64),
        ):
            self._add_state(name, shape, dtype)

    @property
    def config(self) -> dict[str, Any]:
        return {
            **super().config,
            "num_bins": self.num_bins,
            "fine_bins": self.fine_bins,
            "boundary_width": self.boundary_width,
        }

    def _update(self, preds: Predictions, target: Tensor) -> None:
        probs = preds.probs  # raises UserError for hard predictions
        if target.numel() == 0:
            return
        K, M, F, R = self.num_classes, self.num_bins + 1, self.fine_bins + 1, _REGIONS
        B = target.shape[0]
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= K:
            ignored = target == self.ignore_index
            if bool((((target < 0) | (target >= K)) & ~ignored).any()):
                raise invalid_labels_error(target, K, self.ignore_index)
            labels = torch.where(ignored, 0, target).long()
        else:
            ignored = torch.zeros(target.shape, dtype=torch.bool, device=target.device)
            labels = target.long()
        band = class_edge_band(labels, ignored, K, self.boundary_width)
        region = torch.where(ignored, 2, band.long())  # (B, H, W) in {0, 1, 2}
        edges = torch.linspace(0, 1, self.num_bins + 1, dtype=probs.dtype, device=probs.device)

        # top-label: one bincount per sum, per image and region, over pixels (not classes)
        pred = preds.pred
        conf = probs.gather(1, pred.unsqueeze(1)).squeeze(1)
        correct = (pred == labels) & ~ignored
        conf64 = conf.double().flatten()
        image = torch.arange(B, device=target.device).view(B, 1, 1) * R
        idx = (_bin_index(conf, edges) + (region + image) * M).flatten()
        size = B * R * M
        per_image = [
            torch.bincount(idx, minlength=size),
            torch.bincount(idx, weights=conf64, minlength=size),
            torch.bincount(idx, weights=correct.flatten().double(), minlength=size),
        ]
        count, conf_sum, correct_sum = (h.view(B, R, M)[:, :2] for h in per_image)
        self._accumulate("count", count.sum(0))
        self._accumulate("conf", conf_sum.sum(0))
        self._accumulate("correct", correct_sum.sum(0).round().long())
        self._accumulate_image_ece(count, conf_sum, correct_sum)

        region_flat = region.flatten()
        fine = (_fine_index(conf, self.fine_bins) + region * F).flatten()
        self._accumulate("fine_count", torch.bincount(fine, minlength=R * F).view(R, F)[:2])
        self._accumulate(
            "fine_conf",
            torch.bincount(fine, weights=conf64, minlength=R * F).view(R, F)[:2],
        )
        fine_correct = torch.bincount(fine, weights=correct.flatten().double(), minlength=R * F)
        self._accumulate("fine_correct", fine_correct.view(R, F)[:2].round().long())

        # class-wise. A pixel whose top probability exceeds 1 - (first edge) has every other class in
        # bin 0, so only uncertain pixels are binned class by class (a gather of their K-vectors); for
        # the rest the top class reuses `conf` and bin 0 of the others is the remainder of the column
        # sums. No (B, K, H, W) temporary; exact up to float32 rounding of the column sums.
        HW = conf[0].numel()
        flat = probs.reshape(B, K, HW)
        onehot = torch.nn.functional.one_hot(region.reshape(B, HW), R).to(probs.dtype)
        column = torch.bmm(flat, onehot).sum(0).double().T  # (R, K): sum of p_k per region
        uncertain = conf < 1 - edges[1] + _TOP_MARGIN
        where = uncertain.reshape(B, HW).nonzero()  # (n, 2): image, pixel
        vectors = flat[where[:, 0], :, where[:, 1]]  # (n, K)
        u_region = region.reshape(B, HW)[where[:, 0], where[:, 1]]
        u_idx = (
            _bin_index(vectors, edges) + (torch.arange(K, device=probs.device) + u_region[:, None] * K) * M
        ).flatten()
        size = (R + 1) * K * M  # a fourth region slot receives the uncertain pixels' top class below
        class_count = torch.bincount(u_idx, minlength=size)
        class_prob = torch.bincount(u_idx, weights=vectors.double().flatten(), minlength=size)
        t_region = torch.where(uncertain, R, region)
        t_idx = (_bin_index(conf, edges) + (pred + t_region * K) * M).flatten()
        top_count = torch.bincount(t_idx, minlength=size).view(R + 1, K, M)[:R]
        top_prob = torch.bincount(t_idx, weights=conf64, minlength=size).view(R + 1, K, M)[:R]
        class_count = class_count.view(R + 1, K, M)[:R] + top_count
        class_prob = class_prob.view(R + 1, K, M)[:R] + top_prob
        certain = torch.bincount(t_region.flatten(), minlength=R + 1)[:R]  # confident pixels per region
        class_count[:, :, 0] += certain[:, None] - top_count.sum(-1)
        class_prob[:, :, 0] += column - class_prob.sum(-1)
        p_target = probs.gather(1, labels.unsqueeze(1)).squeeze(1)
        hits_idx = (_bin_index(p_target, edges) + region * M + labels * (R * M)).flatten()
        hits = torch.bincount(hits_idx, minlength=K * R * M).view(K, R, M).transpose(0, 1)
        self._accumulate("class_count", class_count[:2])
        self._accumulate("class_prob", class_prob[:2])
        self._accumulate("class_hits", hits[:2])
        squares = torch.einsum("bkn,bkn->bn", flat, flat)

        p_target64 = p_target.double().flatten()
        nll = -p_target64.clamp(min=NLL_MIN_PROB).log()
        brier = squares.double().flatten() - 2 * p_target64 + 1
        self._accumulate("nll", torch.bincount(region_flat, weights=nll, minlength=R)[:2])
        self._accumulate("brier", torch.bincount(region_flat, weights=brier, minlength=R)[:2])

    def _accumulate_image_ece(self, count: Tensor, conf: Tensor, correct: Tensor) -> None:
        """Per-image ECE (B,) for all labelled pixels and for the band, added as count, sum, sum of squares."""
        sums = []
        for c, s, a in (
            (count.sum(1), conf.sum(1), correct.sum(1)),
            (count[:, 1], conf[:, 1], correct[:, 1]),
        ):
            ece = _ece(a, s, c)
            valid = c.sum(-1) > 0
            ece = ece[valid]
            sums.append(torch.stack((valid.sum().double(), ece.sum(), ece.square().sum())))
        self._accumulate("image_ece", torch.stack(sums))

    def compute(self) -> dict[str, Any]:
        s = self._states
        results: dict[str, Any] = {}
        per_class: dict[str, list[float]] = {}
        reliability: dict[str, Any] = {
            "lower": [i / self.num_bins for i in range(self.num_bins)] + [1.0],
            "upper": [(i + 1) / self.num_bins for i in range(self.num_bins)] + [1.0],
        }
        for r, (suffix, name) in enumerate((("", "all"), ("_boundary", "boundary"))):

            def region(state: str, r: int = r) -> Tensor:
                # "all" adds the interior and band histograms; "boundary" is the band alone
                return s[state].sum(0) if r == 0 else s[state][1]

            count, conf, correct = region("count"), region("conf"), region("correct")
            total = int(count.sum())
            nonempty = count > 0
            gap = (correct.double() - conf).abs() / count.double()
            class_ece = (region("class_hits").double() - region("class_prob")).abs().sum(-1) / total
            images, ece_sum, ece_sq = s["image_ece"][r].tolist()
            mean = ece_sum / images if images else math.nan
            results.update(
                {
                    f"ECE{suffix}": float(_ece(correct, conf, count)),
                    f"MCE{suffix}": float(gap[nonempty].max()) if total else math.nan,
                    f"aECE{suffix}": _adaptive_ece(
                        region("fine_count"),
                        region("fine_conf"),
                        region("fine_correct"),
                        self.num_bins,
                    ),
                    f"cwECE{suffix}": float(class_ece.mean()),
                    f"NLL{suffix}": float(region("nll") / total) if total else math.nan,
                    f"Brier{suffix}": float(region("brier") / total) if total else math.nan,
                    f"ECE{suffix}_img_mean": mean,
                    f"ECE{suffix}_img_std": math.sqrt(max(ece_sq / images - mean**2, 0.0)) if images else math.nan,
                }
            )
            per_class[f"cwECE{suffix}"] = class_ece.tolist()
            reliability[name] = {
                "count": count.tolist(),
                "confidence": (conf / count.double()).tolist(),
                "accuracy": (correct.double() / count.double()).tolist(),
            }
        all_pixels = int(self._states["count"].sum())
        results["boundary_fraction"] = int(self._states["count"][1].sum()) / all_pixels if all_pixels else math.nan
        results["per_class"] = per_class
        results["reliability"] = reliability
        return results
