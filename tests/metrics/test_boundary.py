"""BoundaryIoU against a per-class cv2 reference of boundary-iou-api's ``mask_to_boundary``."""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trustseg.errors import UserError
from trustseg.metrics import BoundaryIoU, boundary_counts, boundary_width

IGNORE = 255


def mask_to_boundary(mask, dilation_ratio):
    """boundary-iou-api ``boundary_iou/utils/boundary_utils.py::mask_to_boundary``, rewritten."""
    h, w = mask.shape
    dilation = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=dilation)[1 : h + 1, 1 : w + 1]
    return mask - eroded


def reference_counts(pred, target, K, dilation_ratio, ignore_index=IGNORE):
    inter, union = np.zeros(K, np.int64), np.zeros(K, np.int64)
    for p, t in zip(pred.numpy(), target.numpy()):
        valid = t != ignore_index
        for c in range(K):
            gt_band = mask_to_boundary((t == c).astype(np.uint8), dilation_ratio).astype(bool)
            pred_band = mask_to_boundary(((p == c) & valid).astype(np.uint8), dilation_ratio).astype(bool)
            inter[c] += (gt_band & pred_band).sum()
            union[c] += (gt_band | pred_band).sum()
    return inter, union


def blobby_batch(seed, batch, height, width, K, ignore_fraction=0.1, flip=0.2, ignore_index=IGNORE):
    """Piecewise-constant label maps (so bands have interiors) with speckle, ignore pixels and errors."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, K, (batch, 1, max(1, height // 5), max(1, width // 5)), generator=g).float()
    target = F.interpolate(coarse, size=(height, width), mode="nearest")[:, 0].long()
    speckle = torch.rand(target.shape, generator=g) < 0.03
    target[speckle] = torch.randint(0, K, (int(speckle.sum()),), generator=g)
    pred = target.clone()
    wrong = torch.rand(target.shape, generator=g) < flip
    pred[wrong] = torch.randint(0, K, (int(wrong.sum()),), generator=g)
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = ignore_index
    return pred, target


@pytest.mark.parametrize("seed", range(12))
def test_counts_match_cv2_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    K = int(torch.randint(1, 7, (1,), generator=g))
    height, width = (int(v) for v in torch.randint(1, 48, (2,), generator=g))
    ratio = float(torch.rand(1, generator=g)) * 0.15  # d from 1 up to about 10
    pred, target = blobby_batch(seed, 2, height, width, K)
    inter, union = boundary_counts(pred, target, K, IGNORE, ratio)
    ref_inter, ref_union = reference_counts(pred, target, K, ratio)
    np.testing.assert_array_equal(inter.numpy(), ref_inter)
    np.testing.assert_array_equal(union.numpy(), ref_union)


@pytest.mark.parametrize("K", [254, 255, 1000])
def test_many_classes_match_cv2_reference_on_both_sides_of_the_uint8_fast_path(K):
    # 254 classes is the largest uint8 map (labels, "no class" 254, border 255); above, int32 maps
    ignore = 255 if K < 255 else 65535
    pred, target = blobby_batch(K, 2, 30, 41, K, ignore_index=ignore)
    assert len(target.unique()) > 100  # many classes really occur, with boundaries between them
    inter, union = boundary_counts(pred, target, K, ignore, 0.05)
    ref_inter, ref_union = reference_counts(pred, target, K, 0.05, ignore_index=ignore)
    np.testing.assert_array_equal(inter.numpy(), ref_inter)
    np.testing.assert_array_equal(union.numpy(), ref_union)
    metric = BoundaryIoU(K, ignore_index=ignore, dilation_ratio=0.05)
    metric.update(pred, target)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(metric.compute()["per_class"]["BIoU"], ref_inter / ref_union, equal_nan=True)


def test_accumulator_matches_reference_over_images_of_different_sizes():
    K, ratio = 5, 0.05
    metric = BoundaryIoU(K, dilation_ratio=ratio)
    total_inter, total_union = np.zeros(K), np.zeros(K)
    for seed, (h, w) in enumerate([(40, 60), (33, 20), (64, 64)]):
        pred, target = blobby_batch(seed, 2, h, w, K)
        metric.update(pred, target)
        i, u = reference_counts(pred, target, K, ratio)
        total_inter += i
        total_union += u
    with np.errstate(invalid="ignore"):
        expected = total_inter / total_union
    result = metric.compute()
    np.testing.assert_allclose(result["per_class"]["BIoU"], expected, equal_nan=True)
    assert result["mBIoU"] == pytest.approx(np.nanmean(expected))


def test_band_width_matches_the_paper_numbers():
    assert boundary_width(1024, 2048) == 46  # Cityscapes
    assert boundary_width(512, 512) == 14
    assert boundary_width(3, 3) == 1  # never below one pixel


def test_perfect_prediction_and_absent_classes():
    _, target = blobby_batch(0, 2, 30, 40, 3, ignore_fraction=0.0)
    metric = BoundaryIoU(5)
    metric.update(target.clone(), target)
    biou = metric.compute()["per_class"]["BIoU"]
    assert biou[:3] == [1.0, 1.0, 1.0]
    assert math.isnan(biou[3]) and math.isnan(biou[4])


def test_interior_errors_do_not_matter_boundary_errors_do():
    target = torch.zeros(1, 40, 40, dtype=torch.long)
    target[0, 10:30, 10:30] = 1
    interior = target.clone()
    interior[0, 18:22, 18:22] = 0  # a hole far from every boundary of class 1 ...
    metric = BoundaryIoU(2, dilation_ratio=0.02)  # d = 1
    metric.update(interior, target)
    # ... still creates a predicted boundary (the hole's rim), so class 1 is not perfect
    assert metric.compute()["per_class"]["BIoU"][1] < 1.0
    shifted = torch.roll(target, shifts=1, dims=2)
    worse = BoundaryIoU(2, dilation_ratio=0.02)
    worse.update(shifted, target)
    assert worse.compute()["mBIoU"] < metric.compute()["mBIoU"]


def test_predictions_on_ignored_pixels_do_not_matter():
    pred, target = blobby_batch(3, 2, 32, 32, 4, ignore_fraction=0.3)
    other = torch.where(target == IGNORE, (pred + 1) % 4, pred)
    a, b = boundary_counts(pred, target, 4), boundary_counts(other, target, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors():
    pred, target = blobby_batch(4, 1, 8, 8, 3)
    target[0, 0, 0] = 7
    with pytest.raises(UserError, match=r"\{7\} outside \[0, 3\)"):
        BoundaryIoU(3).update(pred, target)
    with pytest.raises(UserError, match=r"predictions hold class indices 3\.\.3, outside \[0, 3\)"):
        boundary_counts(torch.full((1, 4, 4), 3), torch.zeros(1, 4, 4, dtype=torch.long), 3)
    with pytest.raises(UserError, match=r"\(B, H, W\)"):
        boundary_counts(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long), 3)
    with pytest.raises(UserError, match="ignore_index 255 is a class index"):
        BoundaryIoU(300)
    with pytest.raises(UserError, match="dilation_ratio"):
        BoundaryIoU(3, dilation_ratio=0.0)
