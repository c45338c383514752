"""Boundary IoU (Cheng, Girshick, Dollar, Berg, Kirillov, CVPR 2021) adapted to semantic segmentation.

For each class c, the GT and predicted binary masks are reduced to their inner boundary bands: the
mask pixels within chessboard distance d of a pixel outside the mask, the image border counting as
outside, with d = max(1, round(dilation_ratio * image diagonal)). This is the reference
``mask_to_boundary`` (boundary-iou-api): pad by 1 px of zeros, erode d times with a 3x3 square,
subtract. Boundary intersections and unions are summed over the dataset like the confusion matrix;
BIoU_c = I_c / U_c, NaN for 0/0, and mBIoU is their NaN-mean.

Ignored pixels belong to no class in either mask (predictions on them are dropped first), so the
edge of an ignored region acts like the image border for GT and prediction alike, and ignored pixels
are never counted.

A pixel is in its class's boundary band iff its (2d+1)^2 window holds another label or leaves the
image. Because every pixel has exactly one label, that is one max/min filter over the label map for
all classes at once (no one-hot), and the filters are built by doubling windows: O(log d)
element-wise maxima instead of O(d) per pixel, on uint8 maps up to 254 classes and int32 maps above.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from trustseg.errors import UserError
from trustseg.metrics.base import Accumulator, Predictions, check_label_maps, invalid_labels_error

# Labels, the "no class" label K and the border label 255 share one uint8 map up to this many classes.
_UINT8_CLASSES = 254
_BORDER = {torch.uint8: 255, torch.int32: torch.iinfo(torch.int32).max}


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Band width d in pixels: ``max(1, round(dilation_ratio * sqrt(H^2 + W^2)))`` (46 at 1024x2048)."""
    return max(1, int(round(dilation_ratio * math.hypot(height, width))))


def sliding_max(x: Tensor, window: int, dim: int) -> Tensor:
    """Max over every length-`window` run along `dim` (output shorter by window - 1)."""
    span = 1
    while 2 * span <= window:  # invariant: x[i] = max of the input's [i, i + span)
        n = x.shape[dim] - span
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, span, n))
        span *= 2
    rest = window - span  # 0 <= rest < span: two overlapping runs of length span cover the window
    if rest:
        n = x.shape[dim] - rest
        x = torch.maximum(x.narrow(dim, 0, n), x.narrow(dim, rest, n))
    return x


def label_boundaries(labels: Tensor, d: int) -> Tensor:
    """Inner boundary bands (N, H, W) bool of a uint8 or int32 label map (N, H, W) whose values are
    below the dtype's border label (255, resp. 2**31 - 1).

    True where the pixel's (2d+1) x (2d+1) window contains another label or reaches past the image
    border. For a pixel of class c this is exactly c's binary mask minus its erosion by that square.
    """
    border = _BORDER[labels.dtype]
    # the border label is no label: padding with it raises every window max that reaches it, never the min
    padded = torch.nn.functional.pad(labels, (d, d, d, d), value=border)
    both = torch.stack((padded, border - padded))  # max of B - x gives B - min of x in the same pass
    both = sliding_max(sliding_max(both, 2 * d + 1, -1), 2 * d + 1, -2)
    window_max, window_min = both[0], border - both[1]
    return window_max != window_min


def boundary_counts(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255, dilation_ratio: float = 0.02
) -> tuple[Tensor, Tensor]:
    """Per-class boundary intersection and union pixel counts, each (K,) int64, of (B, H, W) maps."""
    check_label_maps(pred, target, num_classes, ignore_index)
    if target.dim() != 3:
        raise UserError(f"boundary IoU needs (B, H, W) label maps, got shape {tuple(target.shape)}")
    if target.numel() == 0:
        return torch.zeros(num_classes, dtype=torch.int64), torch.zeros(num_classes, dtype=torch.int64)
    return _boundary_counts(pred, target, num_classes, ignore_index, dilation_ratio)


def _boundary_counts(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int, dilation_ratio: float
) -> tuple[Tensor, Tensor]:
    K = num_classes
    gt = torch.where(target == ignore_index, K, target)
    lo, hi = (int(v) for v in torch.aminmax(gt))
    if lo < 0 or hi > K:
        raise invalid_labels_error(target, K, ignore_index)
    dtype = torch.uint8 if K <= _UINT8_CLASSES else torch.int32  # uint8: 4x less memory traffic
    gt = gt.to(dtype)
    pr = torch.where(gt == K, K, pred).to(dtype)
    d = boundary_width(target.shape[-2], target.shape[-1], dilation_ratio)
    bands = label_boundaries(torch.cat((gt, pr)), d)
    gt_band, pr_band = bands.chunk(2)

    def per_class(mask: Tensor, labels: Tensor) -> Tensor:
        return torch.bincount(torch.where(mask, labels, K).flatten(), minlength=K + 1)[:K]

    inter = per_class(gt_band & pr_band & (gt == pr), gt)
    union = per_class(gt_band, gt) + per_class(pr_band, pr) - inter
    return inter, union


class BoundaryIoU(Accumulator):
    """Dataset-level boundary IoU per class and its NaN-mean ``mBIoU`` (state: 2 x K int64 sums).

    d is computed per batch from that batch's H x W, so mixed-size datasets use each image's own band.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, dilation_ratio: float = 0.02) -> None:
        super().__init__(num_classes, ignore_index)
        if not dilation_ratio > 0:
            raise UserError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        self.dilation_ratio = float(dilation_ratio)
        self._add_state("intersection", (num_classes,), torch.int64)
        self._add_state("union", (num_classes,), torch.int64)

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "dilation_ratio": self.dilation_ratio}

    def _update(self, preds: Predictions, target: Tensor) -> None:
        if target.numel() == 0:
            return
        inter, union = _boundary_counts(preds.pred, target, self.num_classes, self.ignore_index, self.dilation_ratio)
        self._accumulate("intersection", inter)
        self._accumulate("union", union)

    def compute(self) -> dict[str, Any]:
        biou = self._states["intersection"].double() / self._states["union"].double()
        return {"mBIoU": float(biou.nanmean()), "per_class": {"BIoU": biou.tolist()}}
