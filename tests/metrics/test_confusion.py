"""ConfusionMatrix / PerImageIoU against torchmetrics and against an mmseg-style NumPy oracle."""

import doctest
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

import trustseg.metrics.confusion
from trustseg.errors import UserError
from trustseg.metrics import ConfusionMatrix, PerImageIoU, confusion_matrix, metrics_from_confusion, per_image_iou

IGNORE = 255


def mmseg_reference(preds, targets, num_classes, ignore_index=IGNORE):
    """mmseg IoUMetric, written out: per-image histograms of the non-ignored pixels, summed, then ratios."""
    K = num_classes
    inter_t, union_t, pred_t, label_t = (np.zeros(K) for _ in range(4))
    for pred, label in zip(np.asarray(preds), np.asarray(targets)):
        mask = label != ignore_index
        pred, label = pred[mask].astype(np.int64), label[mask].astype(np.int64)
        area_inter = np.bincount(pred[pred == label], minlength=K)
        area_pred = np.bincount(pred, minlength=K)
        area_label = np.bincount(label, minlength=K)
        inter_t += area_inter
        union_t += area_pred + area_label - area_inter
        pred_t += area_pred
        label_t += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter_t / union_t
        acc = inter_t / label_t
        dice = 2 * inter_t / (pred_t + label_t)
        precision = inter_t / pred_t
        a_acc = inter_t.sum() / label_t.sum()
        fw = sum(label_t[c] / label_t.sum() * iou[c] for c in range(K) if union_t[c] > 0) if label_t.sum() else np.nan

    def nanmean(x):
        return float(np.mean(x[~np.isnan(x)])) if (~np.isnan(x)).any() else math.nan

    return {
        "aAcc": float(a_acc),
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "mDice": nanmean(dice),
        "mPrecision": nanmean(precision),
        "mRecall": nanmean(acc),
        "fwIoU": float(fw),
        "per_class": {"IoU": iou, "Acc": acc, "Dice": dice, "Precision": precision, "Recall": acc, "support": label_t},
    }


def assert_matches_reference(result, ref):
    for key in ("aAcc", "mIoU", "mAcc", "mDice", "mPrecision", "mRecall", "fwIoU"):
        np.testing.assert_allclose(result[key], ref[key], rtol=1e-12, equal_nan=True, err_msg=key)
    for key, values in ref["per_class"].items():
        np.testing.assert_allclose(
            np.array(result["per_class"][key], dtype=float), values, rtol=1e-12, equal_nan=True, err_msg=key
        )


def random_batch(seed, batch, height, width, num_classes, ignore_fraction=0.1, agreement=0.6, ignore_index=IGNORE):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (batch, height, width), generator=g)
    pred = torch.where(
        torch.rand(target.shape, generator=g) < agreement,
        target,
        torch.randint(0, num_classes, target.shape, generator=g),
    )
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = ignore_index
    return pred, target


def run(pred, target, num_classes, ignore_index=IGNORE, batches=1):
    cm = ConfusionMatrix(num_classes, ignore_index)
    for p, t in zip(pred.chunk(batches), target.chunk(batches)):
        cm.update(p, t)
    return cm.compute()


def edge_cases():
    K = 5
    p, t = random_batch(1, 2, 9, 7, 3)
    yield "classes 3, 4 absent everywhere", p, t, K, IGNORE
    p, t = random_batch(2, 2, 9, 7, 2)
    p[0, :3] = 2  # class 2 predicted, never in the GT
    yield "predicted but absent from GT", p, t, 3, IGNORE
    p, t = random_batch(3, 3, 8, 8, 4)
    t[1] = IGNORE
    yield "one all-ignore image", p, t, 4, IGNORE
    yield "all-ignore stream", p, torch.full_like(t, IGNORE), 4, IGNORE
    yield "single pixel", torch.tensor([[[1]]]), torch.tensor([[[1]]]), 2, IGNORE
    yield "single wrong pixel", torch.tensor([[[0]]]), torch.tensor([[[1]]]), 2, IGNORE
    p, t = random_batch(4, 2, 6, 6, 1)
    yield "K=1", p, t, 1, IGNORE
    p, t = random_batch(5, 2, 6, 6, 2)
    yield "K=2", p, t, 2, IGNORE
    p, t = random_batch(6, 2, 6, 6, 3, ignore_fraction=0.0)
    yield "no ignore pixels", p, t, 3, IGNORE
    p, t = random_batch(7, 2, 6, 6, 3, ignore_index=-1)
    yield "negative ignore_index", p, t, 3, -1
    p, t = random_batch(8, 2, 6, 6, 3, ignore_index=100_000)
    yield "huge ignore_index", p, t, 3, 100_000
    p, t = random_batch(9, 2, 6, 6, 3)
    yield "uint8 inputs", p.to(torch.uint8), t.to(torch.uint8), 3, IGNORE
    p, t = random_batch(10, 2, 6, 6, 3)
    yield "int32 inputs", p.to(torch.int32), t.to(torch.int32), 3, IGNORE


@pytest.mark.parametrize("case", list(edge_cases()), ids=lambda c: c[0])
def test_matches_mmseg_reference_on_edge_cases(case):
    _, pred, target, K, ignore = case
    ref = mmseg_reference(pred, target, K, ignore)
    assert_matches_reference(run(pred, target, K, ignore), ref)
    assert_matches_reference(run(pred, target, K, ignore, batches=pred.shape[0]), ref)


def test_edge_case_conventions():
    """The convention's consequences, spelled out on one tiny case."""
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    pred = torch.tensor([[[0, 2, 1, 2]]])  # class 2 predicted once on a valid pixel, once on an ignored one
    r = run(pred, target, 4)
    iou, acc, support = r["per_class"]["IoU"], r["per_class"]["Acc"], r["per_class"]["support"]
    assert iou[:3] == [0.5, 1.0, 0.0]  # the ignored pixel's prediction is not a false positive for class 2
    assert math.isnan(iou[3]) and math.isnan(acc[2]) and math.isnan(acc[3])
    assert support == [2, 1, 0, 0]
    assert r["mIoU"] == pytest.approx(0.5)
    assert r["aAcc"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed,K,ignore_fraction", [(0, 19, 0.1), (1, 5, 0.3), (2, 2, 0.0), (3, 11, 0.5)])
def test_equals_torchmetrics(seed, K, ignore_fraction):
    pred, target = random_batch(seed, 3, 31, 45, K, ignore_fraction)
    r = run(pred, target, K, batches=3)

    def tm(metric):
        metric.update(pred, target)
        return metric.compute()

    kwargs = {"num_classes": K, "ignore_index": IGNORE}
    assert r["mIoU"] == pytest.approx(tm(MulticlassJaccardIndex(average="macro", **kwargs)).item(), abs=1e-6)
    np.testing.assert_allclose(
        r["per_class"]["IoU"], tm(MulticlassJaccardIndex(average="none", **kwargs)).numpy(), atol=1e-6
    )
    # every class is in the GT here; torchmetrics counts 0/0 recall or precision as 0, mmseg as NaN
    assert r["mAcc"] == pytest.approx(tm(MulticlassAccuracy(average="macro", **kwargs)).item(), abs=1e-6)
    assert r["aAcc"] == pytest.approx(tm(MulticlassAccuracy(average="micro", **kwargs)).item(), abs=1e-6)
    assert r["mDice"] == pytest.approx(tm(MulticlassF1Score(average="macro", **kwargs)).item(), abs=1e-6)


def test_miou_equals_torchmetrics_with_absent_and_spurious_classes():
    pred, target = random_batch(11, 2, 20, 20, 4)
    pred[0, 0, :5] = 5  # class 5 predicted but absent from GT; classes 4, 6 absent everywhere
    K = 7
    r = run(pred, target, K)
    jaccard = MulticlassJaccardIndex(num_classes=K, average="macro", ignore_index=IGNORE)
    jaccard.update(pred, target)
    assert r["mIoU"] == pytest.approx(jaccard.compute().item(), abs=1e-6)
    f1 = MulticlassF1Score(num_classes=K, average="macro", ignore_index=IGNORE)
    f1.update(pred, target)
    assert r["mDice"] == pytest.approx(f1.compute().item(), abs=1e-6)


def test_functional_and_accumulator_agree():
    pred, target = random_batch(12, 4, 10, 12, 6)
    cm = ConfusionMatrix(6)
    for p, t in zip(pred, target):
        cm.update(p[None], t[None])
    assert torch.equal(cm.matrix, confusion_matrix(pred, target, 6))
    assert torch.equal(cm.matrix, sum(confusion_matrix(p, t, 6) for p, t in zip(pred, target)))
    assert cm.compute() == metrics_from_confusion(cm.matrix)


def test_logits_and_hard_predictions_agree():
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 5, 8, 9, generator=g)
    target = torch.randint(0, 5, (2, 8, 9), generator=g)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.matrix, b.matrix)


def test_rows_are_ground_truth():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]), 2)
    assert cm.tolist() == [[1, 2], [0, 0]]


def test_predictions_on_ignored_pixels_do_not_count():
    pred, target = random_batch(14, 2, 16, 16, 5, ignore_fraction=0.4)
    scrambled = torch.where(target == IGNORE, (pred + 1) % 5, pred)
    assert torch.equal(confusion_matrix(pred, target, 5), confusion_matrix(scrambled, target, 5))


@pytest.mark.parametrize(
    "bad_value,ignore_index",
    [(19, IGNORE), (100, IGNORE), (254, IGNORE), (300, IGNORE), (-3, IGNORE), (-3, -1), (19, -1)],
)
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.2])
@pytest.mark.parametrize("metric", [ConfusionMatrix, PerImageIoU])
def test_invalid_target_values_name_the_values_and_k(metric, bad_value, ignore_index, ignore_fraction):
    pred, target = random_batch(15, 2, 6, 6, 19, ignore_fraction, ignore_index=ignore_index)
    target[1, 2, 3] = bad_value
    with pytest.raises(UserError, match=rf"\{{{bad_value}\}} outside \[0, 19\)"):
        metric(19, ignore_index).update(pred, target)


def test_functional_input_errors():
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(UserError, match="outside"):
        confusion_matrix(torch.full((2, 3), 3), t, 3)
    with pytest.raises(UserError, match="shape"):
        confusion_matrix(torch.zeros(3, 2, dtype=torch.long), t, 3)
    with pytest.raises(UserError, match="integer"):
        confusion_matrix(torch.zeros(2, 3), t, 3)
    with pytest.raises(UserError, match="class index"):
        confusion_matrix(t, t, 3, ignore_index=0)
    with pytest.raises(UserError, match=r"\(B, H, W\)"):
        per_image_iou(t, t, 3)


def naive_image_mious(preds, targets, K):
    out = []
    for p, t in zip(preds, targets):
        r = mmseg_reference(p[None], t[None], K)
        out.append(r["mIoU"])
    return np.array(out)


def test_per_image_iou_matches_per_image_torchmetrics():
    pred, target = random_batch(16, 5, 14, 11, 6, ignore_fraction=0.2)
    target[2] = IGNORE  # skipped: no valid pixel
    acc = PerImageIoU(6)
    acc.update(pred[:2], target[:2])
    acc.update(pred[2:], target[2:])
    expected = []
    for p, t in zip(pred, target):
        if (t != IGNORE).any():
            metric = MulticlassJaccardIndex(num_classes=6, average="macro", ignore_index=IGNORE)
            metric.update(p[None], t[None])
            expected.append(metric.compute().item())
    assert acc.compute()["mIoU_img"] == pytest.approx(np.mean(expected), abs=1e-6)
    np.testing.assert_allclose(
        per_image_iou(pred, target, 6).numpy(), naive_image_mious(pred, target, 6), equal_nan=True
    )


def test_per_image_iou_differs_from_dataset_miou():
    # image 0: one big well-segmented class; image 1: a small, badly segmented one
    target = torch.zeros(2, 10, 10, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[1, :1, :2] = 1
    pred[1, 0, 0] = 1
    pred[1, 5, 5] = 1
    img = PerImageIoU(2)
    img.update(pred, target)
    ref = mmseg_reference(pred, target, 2)
    per_image = naive_image_mious(pred, target, 2)
    assert img.compute()["mIoU_img"] == pytest.approx(per_image.mean())
    assert not math.isclose(per_image.mean(), ref["mIoU"])


def test_all_ignore_stream_gives_nan():
    t = torch.full((1, 4, 4), IGNORE)
    img = PerImageIoU(3)
    img.update(torch.zeros_like(t), t)
    assert math.isnan(img.compute()["mIoU_img"])


def test_docstring_example():
    outcome = doctest.testmod(trustseg.metrics.confusion)
    assert outcome.attempted > 0 and outcome.failed == 0
