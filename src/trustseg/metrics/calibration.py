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
  order. It is derived from a fine histogram that splits each of the M bins into S = ceil(F / M)
  equal parts (`fine_bins` = F; sub-bin floor(S * (M * conf - b)) of bin b, plus {1.0}), so that
  every fine bin lies inside one ECE bin and the ECE histograms are its sums; fine bin j joins group
  floor(M * C_j / N), C_j = pixels in fine bins below j. This is an *approximation*: only pixels of
  the at most M-1 fine bins that straddle an exact group boundary can land in another group, and
  moving a pixel changes the sum by at most 2/N, so |aECE - exact| <= 2 * (fraction of pixels in
  those straddling fine bins). For a confidence density f that is about 2 (M-1) f / (M S): it
  shrinks with the fine bin width 1/(M S) <= 1/F, but a heavy tie (saturated confidences all at 1.0)
  keeps it large, and then equal-mass bins are ill-defined anyway.
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

**Scope.** ``classwise=False`` drops cwECE (its K class-wise histograms are most of the cost) and
``boundary_width=0`` drops the band (its keys are NaN); every other value is unchanged.

**Cost.** `update` reads the batch's shared softmax and never bins all K x N probabilities: every
histogram comes from one joint histogram (region, class, bin, kind) of a few entries per pixel (its
top class, its target class, and, where the top probability leaves room for another class to reach
bin 1, each class with p_k >= 1/M), and class-wise bin 0 is what bins 1..M leave of each class's
column sum. The top-label histograms are sums of the aECE fine histogram. On the CPU images go one
at a time and pixels 32768 per thread at a time, so that temporaries stay in cache and memory does
not grow with the image (a fresh (K, H, W) temporary costs more in page faults than its arithmetic);
integer work is int32. Sums over pixels are float64, except within runs of 1024 pixels for the
column sums. `trustseg bench calibration` (benchmarks/RESULTS.md) times it against torchmetrics and
within an evaluation pass.
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
# Pixel regions, used as histogram offsets: interior, boundary band, ignored (dropped).
_REGIONS = 3
# Slack over float32 softmax rounding (the K probabilities sum to 1 within ~K ulp) in the
# "top probability > 1 - first edge puts every other class in bin 0" shortcut.
_TOP_MARGIN = 1e-3
# The class-wise joint histogram (region, class, bin, kind) holds each pixel's top class (its
# confidence) and target class and, where the top probability leaves room for another class to reach
# bin 1 (the pixel is flagged), each class with p_k >= the first edge, its top class included. A top
# entry's kind is 1 if its pixel is flagged, so that class-wise sums count a flagged pixel's top class
# once; then target and K-vector entries. Class-wise bin 0 is what bins 1..M leave of each region's
# pixel count and column sum. The top-label histograms come from the fine histogram, not from here.
_TARGET, _VECTOR, _KINDS = 2, 3, 4
# Pixels per step of `CalibrationHistogram._update_image` on the CPU and per thread, and per float32 run of
# `_column_sums`.
_PIXELS = 32768
_COLUMN_PIXELS = 1024


def bin_index(x: Tensor, num_bins: int) -> Tensor:
    """torchmetrics' bin of each value in [0, 1], int32: ``bucketize(x, linspace(0, 1, M+1), right=True) - 1``.

    bucketize's binary search costs ~20 ns a value on CPU, trunc(M x) ~1 ns. They differ only where
    M x lies within rounding of an integer (the linspace edges and the product are each rounded, to
    either side, by a few ulps of M), so only the values with M x within M * 2^-16 of an integer,
    a margin 100x wider, are bucketized. Tests compare every float within 256 ulps of every edge.
    """
    scaled = x * num_bins
    index = scaled.int()
    near = ((scaled - scaled.round()).abs_() < num_bins * 2.0**-16).nonzero(as_tuple=True)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=x.dtype, device=x.device)
    index[near] = torch.bucketize(x[near], edges, right=True, out_int32=True) - 1
    return index


def sub_bins(num_bins: int, fine_bins: int) -> int:
    """S, the parts each ECE bin is split into for at least `fine_bins` fine bins."""
    return -(-fine_bins // num_bins)


def fine_index(x: Tensor, bins: Tensor, num_bins: int, sub: int) -> Tensor:
    """Fine bin b * S + floor(S * (M x - b)) of each x in [0, 1], given its ECE bin b (`bin_index`); M S for x = 1.

    Monotone in x (every step is), and inside ECE bin b by construction: the clamp absorbs the
    rounding of M x where `bin_index` corrected the bin.
    """
    part = (x * num_bins - bins).mul_(sub).int().clamp_(0, sub - 1)
    return part.add_(bins, alpha=sub)


def coarse(fine: Tensor, num_bins: int, sub: int) -> Tensor:
    """ECE-bin histograms (R, M + 1, ...) from fine ones (R, M S + 1, ...): each ECE bin is the sum of
    its S fine bins, and the bin of 1.0 stays."""
    M, S = num_bins, sub
    return torch.cat((fine[:, : M * S].unflatten(1, (M, S)).sum(2), fine[:, M * S :]), 1)


def class_edge_band(target: Tensor, ignored: Tensor, num_classes: int, width: int) -> Tensor:
    """(B, H, W) bool: labelled pixels with a labelled pixel of another class within L-inf `width`.

    `target` holds class indices in [0, K) wherever `ignored` is False. One pair of sliding maxima:
    of t+1 (the window's max label + 1) and of K-t (K minus its min label), ignored pixels and the
    padding being 0, so neither counts as an edge; the window is mixed iff max label != min label.
    """
    K = num_classes
    dtype = torch.uint8 if K < 255 else torch.int32  # K + 1 must fit
    t = target.to(dtype)
    both = torch.stack(((t + 1).masked_fill_(ignored, 0), (K - t).masked_fill_(ignored, 0)))
    both = torch.nn.functional.pad(both, (width, width, width, width))
    window = 2 * width + 1
    both = sliding_max(sliding_max(both, window, -1), window, -2)
    return (both[0] != (K + 1) - both[1]) & ~ignored


def _column_sums(probs: Tensor, masks: Tensor) -> Tensor:
    """(R, K) float64 sums of probs (K, n) over the pixels of each mask row (R, n), both float32.

    A float32 matmul adds its products in sequence (4e-6 off in relative terms over 32768 pixels,
    1.5e-4 over 512x1024, which moves cwECE), and a float64 one pays a conversion of all K x n
    probabilities; so runs of `_COLUMN_PIXELS` pixels are summed in float32 by one batched matmul
    (1e-8 off) and the runs in float64.
    """
    L = _COLUMN_PIXELS
    whole = probs.shape[1] // L * L
    R, K = masks.shape[0], probs.shape[0]
    runs = torch.bmm(masks[:, :whole].view(R, -1, L).transpose(0, 1), probs[:, :whole].view(K, -1, L).permute(1, 2, 0))
    rest = masks[:, whole:].double() @ probs[:, whole:].T.double()
    return runs.sum(0, dtype=torch.float64) + rest


def _vector_entries(probs: Tensor, start: int, pixels: Tensor, first_edge: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(pixel, class, p_k) of every p_k >= the first bin edge of the pixels `start + i` flagged in `pixels`.

    probs (K, N) is the whole image, contiguous: index_select copies a strided input (a chunk) first.
    Gathering the flagged pixels' K-vectors costs a fraction of masking all K x n probabilities
    (nonzero over K x n is the slowest step there is).
    """
    at = pixels.nonzero().squeeze(1).add_(start)
    vectors = probs.index_select(1, at)
    cls, j = (vectors >= first_edge).nonzero().unbind(1)
    return at.take(j).sub_(start), cls, vectors.view(-1).take(cls * vectors.shape[1] + j)


def _pixel_sums(
    image: Tensor, start: int, pred: Tensor, labels: Tensor, region: Tensor, num_bins: int, sub: int, classwise: bool
) -> tuple[Tensor, ...]:
    """The raw sums of a run of pixels: `image` (K, N) contiguous, the run `start + i` of pred, labels
    and region (n,): pred and region int32 (region 2 = ignored), labels int64 (a gather index). Integer
    work is int32, which the CPU does about 3x faster than int64.

    Returns, per region: the fine top-label histogram's count and confidence sum (3, M S + 1, 2 =
    wrong, right); the class-wise joint histogram's count and probability sum (3, K, M+1, kinds) and
    the column sums (2, K), zeros unless `classwise`; the sums of p_target, of the NLL and of the
    squares (3,).
    """
    K, M, R = image.shape[0], num_bins, _REGIONS
    n = len(labels)
    probs = image[:, start : start + n]
    conf = probs.amax(0)  # = the probability of `pred`, whose softmax numerator exp(0) = 1 is the largest
    p_target = probs.gather(0, labels.unsqueeze(0)).squeeze(0)
    squares = (probs * probs).sum(0)  # while the run is in cache
    labels = labels.int()
    shape = (R, K, M + 1, _KINDS)
    count, total = probs.new_zeros(shape, dtype=torch.int64), probs.new_zeros(shape, dtype=torch.float64)
    columns = probs.new_zeros((2, K), dtype=torch.float64)
    if classwise:
        first_edge = torch.linspace(0, 1, M + 1, dtype=probs.dtype, device=probs.device)[1]
        vector = conf <= 1 - first_edge + _TOP_MARGIN
        pixel, cls, prob = _vector_entries(image, start, vector, first_edge)
        # joint index = ((region * K + class) * (M + 1) + bin) * kinds + kind; top, target, vector entries
        stride, region_row = (M + 1) * _KINDS, region * K
        keys = torch.cat((
            (region_row + pred).mul_(stride).add_(vector),
            (region_row + labels).mul_(stride).add_(_TARGET),
            (region.take(pixel) * K + cls.int()).mul_(stride).add_(_VECTOR),
        ))
        values = torch.cat((conf, p_target, prob))
        bins = bin_index(values, M)
        index = bins * _KINDS + keys
        count = torch.bincount(index, minlength=count.numel()).view(shape)
        total = torch.bincount(index, values.double(), minlength=count.numel()).view(shape)
        columns = _column_sums(probs, torch.stack((region == 0, region == 1)).to(probs.dtype))
        bins = bins[:n]
    else:
        bins = bin_index(conf, M)
    fine_bins = M * sub + 1
    fine = fine_index(conf, bins, M, sub).add_(region, alpha=fine_bins).mul_(2).add_(pred == labels)
    fine_count = torch.bincount(fine, minlength=R * fine_bins * 2).view(R, fine_bins, 2)
    fine_conf = torch.bincount(fine, conf.double(), minlength=R * fine_bins * 2).view(R, fine_bins, 2)
    p_target = p_target.double()
    nll = p_target.clamp(min=NLL_MIN_PROB).log_().neg_()
    squares = squares.double()
    sums = torch.stack([torch.bincount(region, w, minlength=R) for w in (p_target, nll, squares)])
    return (fine_count, fine_conf, count, total, columns, *sums)


def _ece(correct: Tensor, conf: Tensor, count: Tensor) -> Tensor:
    """sum_b |sum correct - sum conf| / N over the last dim (float64), NaN where N = 0."""
    return (correct.double() - conf).abs().sum(-1) / count.sum(-1).double()


def _image_ece(count: Tensor, conf: Tensor, correct: Tensor) -> Tensor:
    """One image's (2, 3) float64 per region kind (all, band): 1, its ECE and ECE^2, or zeros if no pixel counts.

    count, conf, correct: (2, M+1) top-label histograms of the interior and the band.
    """
    count, conf, correct = (torch.stack((h.sum(0), h[1])) for h in (count, conf, correct))
    valid = count.sum(-1) > 0
    ece = torch.where(valid, _ece(correct, conf, count), 0.0)
    return torch.stack((valid.double(), ece, ece.square()), 1)


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

    See the module docstring for the definitions and the cost. Reads the batch's shared
    `Predictions.probs` (so it needs logits; hard predictions raise `UserError`). State, float64 sums
    and int64 counts: for two regions (interior, band), fine top-label histograms of M S + 1 bins (the
    M + 1 ECE bins are their sums), K class-wise histograms of M+1 bins, NLL and Brier sums, and per-image ECE sums and sums of squares.

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
        classwise: bool = True,
    ) -> None:
        super().__init__(num_classes, ignore_index)
        for name, value, least in (
            ("num_bins", num_bins, 1),
            ("fine_bins", fine_bins, 1),
            ("boundary_width", boundary_width, 0),
        ):
            if not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be an integer >= {least}, got {value!r}")
        self.num_bins, self.fine_bins, self.boundary_width = num_bins, fine_bins, boundary_width
        self.classwise = bool(classwise)
        self.sub_bins = sub_bins(num_bins, fine_bins)
        K, M, F = num_classes, num_bins + 1, num_bins * self.sub_bins + 1
        # the ECE-bin histograms (count, confidence sum, correct) are sums of the fine ones (`coarse`)
        states = [
            ("fine_count", (2, F), torch.int64),
            ("fine_conf", (2, F), torch.float64),
            ("fine_correct", (2, F), torch.int64),
            ("nll", (2,), torch.float64),
            ("brier", (2,), torch.float64),
            # per region kind (all, band): images, sum of per-image ECE, sum of its squares
            ("image_ece", (2, 3), torch.float64),
        ]
        if self.classwise:
            states += [
                ("class_count", (2, K, M), torch.int64),
                ("class_prob", (2, K, M), torch.float64),
                ("class_hits", (2, K, M), torch.int64),
            ]
        for name, shape, dtype in states:
            self._add_state(name, shape, dtype)

    @property
    def config(self) -> dict[str, Any]:
        return {
            **super().config,
            "num_bins": self.num_bins,
            "fine_bins": self.fine_bins,
            "boundary_width": self.boundary_width,
            "classwise": self.classwise,
        }

    def _update(self, preds: Predictions, target: Tensor) -> None:
        probs = preds.probs  # raises UserError for hard predictions
        if target.numel() == 0:
            return
        K = self.num_classes
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= K:
            if bool((((target < 0) | (target >= K)) & (target != self.ignore_index)).any()):
                raise invalid_labels_error(target, K, self.ignore_index)
        flat = probs.reshape(target.shape[0], K, -1)
        # One image at a time: glibc maps allocations over 32 MB (a batch's int64 label map at 8 x
        # 512x1024) afresh each time, page fault by page fault, and reuses smaller ones.
        for image in range(target.shape[0]):
            labels = target[image : image + 1]
            ignored = labels == self.ignore_index
            band = class_edge_band(labels, ignored, K, self.boundary_width) if self.boundary_width else 0
            region = torch.where(ignored, 2, band).int()
            labels = torch.where(ignored, 0, labels).long()
            self._update_image(flat[image], preds.pred[image].flatten().int(), labels.flatten(), region.flatten())

    def _update_image(self, probs: Tensor, pred: Tensor, labels: Tensor, region: Tensor) -> None:
        """Add one image: probs (K, N) contiguous, and per pixel pred, labels, region (N,) (see `_pixel_sums`).

        Its raw sums (`_pixel_sums`) are taken `_PIXELS` pixels per thread at a time on the CPU, so that the
        per-pixel temporaries stay in cache and memory does not grow with the image, and in one step
        on an accelerator, where every step costs ~100 kernel launches and a few synchronisations;
        every state is derived from them.
        """
        # torch splits an op over threads in grains of 32768 elements: give each thread (up to 4) one
        step = _PIXELS * min(torch.get_num_threads(), 4) if probs.device.type == "cpu" else probs.shape[1]
        steps = (
            _pixel_sums(probs, at, pred[at : at + step], labels[at : at + step], region[at : at + step],
                        self.num_bins, self.sub_bins, self.classwise)
            for at in range(0, probs.shape[1], step)
        )
        fine_count, fine_conf, count, total, columns, p_target, nll, squares = (
            sum(parts)[:2] for parts in zip(*steps)
        )
        self._accumulate("fine_count", fine_count.sum(-1))
        self._accumulate("fine_conf", fine_conf.sum(-1))
        self._accumulate("fine_correct", fine_count[..., 1])

        top_label = coarse(fine_count, self.num_bins, self.sub_bins)  # (2, M + 1, right)
        top_conf = coarse(fine_conf, self.num_bins, self.sub_bins).sum(-1)
        self._accumulate("image_ece", _image_ece(top_label.sum(-1), top_conf, top_label[..., 1]))

        pixels = top_label.sum((1, 2))  # labelled pixels per region
        self._accumulate("nll", nll)
        self._accumulate("brier", squares - 2 * p_target + pixels)
        if self.classwise:
            class_count = count[..., 0] + count[..., _VECTOR]
            class_prob = total[..., 0] + total[..., _VECTOR]
            class_count[..., 0] = pixels[:, None] - class_count[..., 1:].sum(-1)
            class_prob[..., 0] = columns - class_prob[..., 1:].sum(-1)
            self._accumulate("class_count", class_count)
            self._accumulate("class_prob", class_prob)
            self._accumulate("class_hits", count[..., _TARGET])

    def compute(self) -> dict[str, Any]:
        s = dict(self._states)
        for name, fine in (("count", "fine_count"), ("conf", "fine_conf"), ("correct", "fine_correct")):
            s[name] = coarse(s[fine], self.num_bins, self.sub_bins)
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
            images, ece_sum, ece_sq = s["image_ece"][r].tolist()
            mean = ece_sum / images if images else math.nan
            classwise = {}
            if self.classwise:
                class_ece = (region("class_hits").double() - region("class_prob")).abs().sum(-1) / total
                classwise[f"cwECE{suffix}"] = float(class_ece.mean())
                per_class[f"cwECE{suffix}"] = class_ece.tolist()
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
                    **classwise,
                    f"NLL{suffix}": float(region("nll") / total) if total else math.nan,
                    f"Brier{suffix}": float(region("brier") / total) if total else math.nan,
                    f"ECE{suffix}_img_mean": mean,
                    f"ECE{suffix}_img_std": math.sqrt(max(ece_sq / images - mean**2, 0.0)) if images else math.nan,
                }
            )
            reliability[name] = {
                "count": count.tolist(),
                "confidence": (conf / count.double()).tolist(),
                "accuracy": (correct.double() / count.double()).tolist(),
            }
        all_pixels = int(s["count"].sum())
        results["boundary_fraction"] = int(s["count"][1].sum()) / all_pixels if all_pixels else math.nan
        results["per_class"] = per_class
        results["reliability"] = reliability
        return results
