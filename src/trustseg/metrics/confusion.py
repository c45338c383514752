"""Confusion-matrix metrics: aAcc, mIoU, mAcc, mDice, mPrecision, mRecall, fwIoU, and per-image mIoU.

Conventions (mmsegmentation's `IoUMetric`, the community standard): one confusion matrix summed over
the whole dataset; rows are ground truth, columns predictions; pixels whose target is `ignore_index`
count nowhere, so predictions on them are not false positives. Per class c with I = TP, G = #gt=c,
P = #pred=c, U = G + P - I: IoU = I/U, Acc = Recall = I/G, Precision = I/P, Dice = 2I/(G+P). A 0/0 is
NaN and means are NaN-means, so a class absent from both GT and predictions is excluded, while a class
predicted but absent from the GT has IoU 0 (included) and Acc NaN (excluded). fwIoU weights IoU by
GT frequency over the classes with U > 0. `ignore_index` may not be a class index (see `Accumulator`).
`mIoU` equals torchmetrics' ``MulticlassJaccardIndex(average="macro", ignore_index=255)``.

`PerImageIoU` is the other convention (mean over images of each image's mIoU), named `mIoU_img` so it
is never confused with the dataset-level `mIoU`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from trustseg.errors import UserError
from trustseg.metrics.base import Accumulator, Predictions, check_label_maps, invalid_labels_error

# An ignore label in [K, _MAX_DIRECT_IGNORE] gets its own bincount row; others are remapped first.
_MAX_DIRECT_IGNORE = 4096


def _confusion_counts(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int, *, per_image: bool = False
) -> Tensor:
    """Confusion counts (K, K) int64, or (B, K, K) with `per_image`, for valid class indices `pred`.

    One fused ``p + K*t`` and one bincount. Target rows >= K are not routed away with a `where`: they
    land in extra bincount rows, the ignore label's row is dropped and any other non-empty extra row
    is an invalid label, so validating the target costs one `aminmax` instead of extra passes.
    """
    K = num_classes
    t = target
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo >= 0 and hi < K:
        rows, ignore_row = K, None
    elif lo >= 0 and K <= ignore_index <= _MAX_DIRECT_IGNORE and hi <= ignore_index:
        rows, ignore_row = hi + 1, ignore_index
    else:  # a negative or very large ignore label, or labels beyond it
        if bool((((t < 0) | (t >= K)) & (t != ignore_index)).any()):
            raise invalid_labels_error(t, K, ignore_index)
        t = torch.where(t == ignore_index, K, t.long())
        rows, ignore_row = K + 1, K
    p = pred if pred.dtype == torch.int64 else pred.long()
    index = torch.add(p, t, alpha=K)  # int64 arithmetic even for uint8 targets (type promotion)
    batches = 1
    if per_image:
        batches = index.shape[0]
        offsets = torch.arange(batches, device=index.device).mul_(rows * K).view(-1, *([1] * (index.dim() - 1)))
        index = index + offsets
    counts = torch.bincount(index.flatten(), minlength=batches * rows * K).view(batches, rows, K)
    if rows > K:
        spilled = counts[:, K:].sum(dim=(0, 2))
        if ignore_row is not None and ignore_row < rows:
            spilled[ignore_row - K] = 0
        if bool(spilled.any()):
            raise invalid_labels_error(target, K, ignore_index)
    counts = counts[:, :K]
    return counts if per_image else counts[0]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix (K, K) int64 of integer `pred` and `target` of any equal shape.

    Rows are ground truth, columns predictions; pixels with ``target == ignore_index`` are skipped.
    """
    check_label_maps(pred, target, num_classes, ignore_index)
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64, device=target.device)
    return _confusion_counts(pred, target, num_classes, ignore_index)


def _class_scores(cm: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, Acc, Dice, Precision over the last two dims of (..., K, K) counts, float64."""
    cm = cm.double()
    inter = cm.diagonal(dim1=-2, dim2=-1)
    gt = cm.sum(-1)
    pred = cm.sum(-2)
    # float division gives NaN for 0/0 (I <= G, P, U), exactly the convention's "absent class"
    return {
        "IoU": inter / (gt + pred - inter),
        "Acc": inter / gt,
        "Dice": 2 * inter / (gt + pred),
        "Precision": inter / pred,
        "support": gt,
    }


def metrics_from_confusion(cm: Tensor) -> dict[str, Any]:
    """Summary metrics (fractions in [0, 1], NaN when undefined) and per-class lists from a (K, K) matrix."""
    scores = _class_scores(cm)
    iou, gt = scores["IoU"], scores["support"]
    total = gt.sum()
    # classes with U = 0 have NaN IoU and G = 0: nansum drops them, as fwIoU's definition asks
    fw_iou = torch.nansum(gt / total * iou) if total > 0 else torch.tensor(float("nan"))
    return {
        "aAcc": float(cm.diagonal().sum().double() / total),
        "mIoU": float(iou.nanmean()),
        "mAcc": float(scores["Acc"].nanmean()),
        "mDice": float(scores["Dice"].nanmean()),
        "mPrecision": float(scores["Precision"].nanmean()),
        "mRecall": float(scores["Acc"].nanmean()),
        "fwIoU": float(fw_iou),
        "per_class": {
            "IoU": iou.tolist(),
            "Acc": scores["Acc"].tolist(),
            "Dice": scores["Dice"].tolist(),
            "Precision": scores["Precision"].tolist(),
            "Recall": scores["Acc"].tolist(),
            "support": [int(g) for g in gt.tolist()],
        },
    }


def per_image_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """mIoU of each image (B,) float64 for `pred`, `target` (B, H, W): NaN-mean over the classes with
    U > 0 in that image; NaN for an image whose pixels are all ignored."""
    check_label_maps(pred, target, num_classes, ignore_index)
    if target.dim() != 3:
        raise UserError(f"per-image IoU needs (B, H, W) label maps, got shape {tuple(target.shape)}")
    return _image_mious(pred, target, num_classes, ignore_index)


def _image_mious(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    if target.numel() == 0:
        return torch.full((target.shape[0],), float("nan"), dtype=torch.float64)
    counts = _confusion_counts(pred, target, num_classes, ignore_index, per_image=True)
    return _class_scores(counts)["IoU"].nanmean(-1)


class ConfusionMatrix(Accumulator):
    """Dataset-level confusion matrix (K, K) int64 (rows GT, columns prediction) and its metrics.

    >>> cm = ConfusionMatrix(num_classes=3)
    >>> cm.update(torch.tensor([[[0, 1], [2, 2]]]), torch.tensor([[[0, 1], [2, 255]]]))
    >>> cm.compute()["mIoU"]
    1.0
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self._add_state("confusion", (num_classes, num_classes), torch.int64)

    @property
    def matrix(self) -> Tensor:
        return self._states["confusion"]

    def _update(self, preds: Predictions, target: Tensor) -> None:
        if target.numel():
            self._accumulate("confusion", _confusion_counts(preds.pred, target, self.num_classes, self.ignore_index))

    def compute(self) -> dict[str, Any]:
        return metrics_from_confusion(self.matrix)


class PerImageIoU(Accumulator):
    """``mIoU_img``: the mean over images of each image's mIoU (images with no valid pixel are skipped).

    Not the community mIoU (that is `ConfusionMatrix`): small objects weigh as much as large ones.
    The state is two sums, the per-image mIoUs (float64) and the image count.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        self._add_state("miou_sum", (), torch.float64)
        self._add_state("images", (), torch.int64)

    def _update(self, preds: Predictions, target: Tensor) -> None:
        mious = _image_mious(preds.pred, target, self.num_classes, self.ignore_index)
        valid = ~mious.isnan()
        self._accumulate("miou_sum", mious[valid].sum())
        self._accumulate("images", valid.sum())

    def compute(self) -> dict[str, Any]:
        images = int(self._states["images"])
        return {"mIoU_img": float(self._states["miou_sum"]) / images if images else float("nan")}


class PerImageConfusion(Accumulator):
    """One confusion matrix (K, K) int64 per image, for statistics over images (e.g. a bootstrap of mIoU).

    The state is (num_images, K, K) int64, so its memory is num_images * K^2 * 8 bytes (500 images of 19
    classes: 1.4 MB; 2000 of 150: 360 MB): bounded, but large enough to be asked for, not on by default.
    Row i is the image of index i in the evaluated dataset. `evaluate()` tells the accumulator which
    images a batch holds through `index_batch` used as (or inside) its ``batch_transform``; without it,
    images fill the rows in the order they arrive. Under torchrun every process fills the rows of its
    own images, so the sum over processes (`all_reduce`) is the whole table.
    """

    def __init__(self, num_classes: int, num_images: int, ignore_index: int = 255) -> None:
        super().__init__(num_classes, ignore_index)
        if num_images < 1:
            raise UserError(f"num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self._add_state("confusion", (num_images, num_classes, num_classes), torch.int64)
        self._pending: list[int] | None = None
        self._next = 0

    @property
    def config(self) -> dict[str, Any]:
        return {**super().config, "num_images": self.num_images}

    @property
    def matrices(self) -> Tensor:
        return self._states["confusion"]

    def index_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch transform: note the dataset indices (``batch["index"]``) of the next batch's images."""
        self._pending = [int(i) for i in batch["index"]]
        return batch

    def _update(self, preds: Predictions, target: Tensor) -> None:
        images = target.shape[0]
        if self._pending is not None:
            rows, self._pending = self._pending, None
        else:
            rows, self._next = list(range(self._next, self._next + images)), self._next + images
        if len(rows) != images or min(rows) < 0 or max(rows) >= self.num_images:
            raise UserError(f"PerImageConfusion: image rows {rows[:4]}... do not fit a batch of {images} "
                            f"images among {self.num_images}")
        if target.numel():
            counts = _confusion_counts(preds.pred, target, self.num_classes, self.ignore_index, per_image=True)
            state = self._states["confusion"]
            state[torch.tensor(rows, device=state.device)] += counts.to(state.device)

    def compute(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        super().reset()
        self._pending, self._next = None, 0
