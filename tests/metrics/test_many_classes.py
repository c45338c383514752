"""Every accumulator at 1000 classes (16-bit labels, ignore label 65535) against independent references
(Boundary IoU at 1000 classes: tests/metrics/test_boundary.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from torchmetrics.classification import MulticlassCalibrationError, MulticlassConfusionMatrix

from trustseg.data.base import ignore_index_for
from trustseg.metrics import CalibrationHistogram, ConfusionMatrix, PerImageIoU, UncertaintyHistogram

K = 1000
IGNORE = ignore_index_for(K)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    """Logits (2, K, 14, 11) that favour the target class on about half the pixels; targets use
    class ids above 255 (so an 8-bit path would wrap) and some ignored pixels."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, K, (2, 14, 11), generator=g)
    target[0, :4] = torch.randint(256, K, (4, 11), generator=g)
    logits = torch.randn(2, K, 14, 11, generator=g, dtype=torch.float64)
    boost = (torch.rand(target.shape, generator=g) < 0.5).double() * 12
    logits.scatter_add_(1, target[:, None], boost[:, None])
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
    return logits, target


def test_convention_is_65535_above_255_classes():
    assert (ignore_index_for(255), ignore_index_for(256), ignore_index_for(1000)) == (255, 65535, 65535)


def test_confusion_matrix_and_per_image_iou(batch):
    logits, target = batch
    cm, per_image = ConfusionMatrix(K, IGNORE), PerImageIoU(K, IGNORE)
    cm.update(logits, target)
    per_image.update(logits, target)
    reference = MulticlassConfusionMatrix(K, ignore_index=IGNORE)(logits.argmax(1), target)
    assert torch.equal(cm.matrix, reference)
    assert int(cm.matrix[256:].sum()) > 0  # classes past 8 bits really counted

    def miou(pred, gt):
        ious = [np.sum((pred == c) & (gt == c)) / np.sum((pred == c) | (gt == c))
                for c in range(K) if np.any((pred == c) | (gt == c))]
        return np.mean(ious)

    pred = logits.argmax(1).numpy()
    naive = [miou(p[t != IGNORE], t[t != IGNORE]) for p, t in zip(pred, target.numpy())]
    assert per_image.compute()["mIoU_img"] == pytest.approx(np.mean(naive), abs=1e-12)
    assert cm.compute()["mIoU"] == pytest.approx(miou(pred[target != IGNORE], target.numpy()[target != IGNORE]),
                                                 abs=1e-12)


def test_calibration_histogram(batch):
    logits, target = batch
    metric = CalibrationHistogram(K, ignore_index=IGNORE)
    metric.update(logits, target)
    result = metric.compute()
    probs = logits.softmax(1)
    ece = MulticlassCalibrationError(K, n_bins=15, norm="l1", ignore_index=IGNORE)(probs, target)
    assert result["ECE"] == pytest.approx(float(ece), abs=1e-6)
    valid = target != IGNORE
    assert result["NLL"] == pytest.approx(float(F.cross_entropy(logits, target, ignore_index=IGNORE)), rel=1e-6)
    onehot = F.one_hot(target.clamp(max=K - 1), K).permute(0, 3, 1, 2).double()
    brier = ((probs - onehot) ** 2).sum(1)[valid].mean()
    assert result["Brier"] == pytest.approx(float(brier), rel=1e-6)


def test_uncertainty_histogram(batch):
    logits, target = batch
    metric = UncertaintyHistogram(K, ignore_index=IGNORE, measures=("msp",))
    metric.update(logits, target)
    result = metric.compute()
    valid = (target != IGNORE).numpy()
    msp = (1 - logits.softmax(1).amax(1)).numpy()[valid]
    wrong = (logits.argmax(1) != target).numpy()[valid]
    exact = mannwhitneyu(msp[wrong], msp[~wrong]).statistic / (wrong.sum() * (~wrong).sum())
    assert abs(result["AUROC_msp"] - exact) <= result["histogram_error"]["AUROC_msp"] + 1e-12

