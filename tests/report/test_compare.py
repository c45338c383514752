"""Kendall's tau-b against scipy, rankings and sentences by hand, and the bootstrap of mIoU differences
against a naive loop over the same resamples; the per-image confusion accumulator against the
functional confusion matrix of each image."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kendalltau

from trustseg.errors import UserError
from trustseg.metrics.confusion import ConfusionMatrix, PerImageConfusion, confusion_matrix, metrics_from_confusion
from trustseg.report.compare import (
    bootstrap_miou_difference,
    direction,
    disagreements,
    kendall_tau_b,
    miou_of_confusions,
    opposed,
    ranking,
    ranking_text,
    resample_batches,
    tau_matrix,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=25))
def test_kendall_tau_b_matches_scipy_with_ties(pairs):
    x, y = zip(*pairs)
    expected = kendalltau(x, y, variant="b").statistic
    got = kendall_tau_b(x, y)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_b_drops_nan_pairs_and_known_values():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, math.nan, 3], [1, 2, 0, 3]) == 1.0
    assert math.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))  # constant: undefined
    with pytest.raises(UserError):
        kendall_tau_b([1, 2], [1, 2, 3])


def test_direction_and_ranking():
    assert direction("mIoU") == 1 and direction("AUROC_entropy") == 1
    assert direction("ECE") == -1 and direction("NLL") == -1 and direction("AURC_msp") == -1
    assert direction("num_images") == 0
    assert ranking({"a": 0.5, "b": 0.7, "c": math.nan}, "mIoU") == ["b", "a", "c"]
    assert ranking({"a": 0.05, "b": 0.02, "c": 0.09}, "ECE") == ["b", "a", "c"]
    with pytest.raises(UserError, match="direction"):
        ranking({"a": 1.0}, "num_images")


def test_ranking_text_ties_equal_values_and_sets_missing_ones_apart():
    assert ranking_text({"a": 0.5, "b": 0.7, "c": 0.5, "d": math.nan}, "mIoU") == "b > a = c (no value: d)"
    assert ranking_text({"a": 0.05, "b": 0.02}, "ECE") == "b > a"
    assert ranking_text({"a": math.nan}, "ECE") == "- (no value: a)"


def test_tau_matrix_orients_metrics_so_that_agreement_is_positive():
    # a better mIoU goes with a lower ECE in every run: the two metrics agree, tau +1 after orientation
    table = {"a": {"mIoU": 0.5, "ECE": 0.10}, "b": {"mIoU": 0.6, "ECE": 0.05}, "c": {"mIoU": 0.7, "ECE": 0.01}}
    taus = tau_matrix(table, ["mIoU", "ECE"])
    assert taus[0, 1] == pytest.approx(1.0) and taus[0, 0] == pytest.approx(1.0)


def test_opposed_names_the_pairs_that_rank_in_reverse():
    table = {"a": {"mIoU": 0.5, "ECE": 0.01, "NLL": 0.9}, "b": {"mIoU": 0.6, "ECE": 0.05, "NLL": 0.8},
             "c": {"mIoU": 0.7, "ECE": 0.09, "NLL": 0.7}}
    metrics = ["mIoU", "ECE", "NLL"]
    sentences = opposed(tau_matrix(table, metrics), metrics, "runs")
    assert sentences == ["mIoU and ECE order the runs in opposite ways (tau = -1.00): better by one is often worse "
                         "by the other.", "ECE and NLL order the runs in opposite ways (tau = -1.00): better by one "
                         "is often worse by the other."]


def test_disagreements_name_the_best_run_per_aspect():
    table = {"a": {"mIoU": 0.70, "ECE": 0.09, "mean_corrupted_mIoU": 0.30},
             "b": {"mIoU": 0.65, "ECE": 0.02, "mean_corrupted_mIoU": 0.40}}
    sentences = disagreements(table)
    assert sentences == ["a has the best mIoU, but b is the best calibrated (lowest ECE).",
                         "a has the best mIoU, but b is the most robust (highest mean_corrupted_mIoU)."]
    assert disagreements({"a": {"mIoU": 0.7, "ECE": 0.01}, "b": {"mIoU": 0.6, "ECE": 0.02}}) == []


def random_confusions(images, classes, seed, bias=0.0):
    """Per-image confusion counts of random 8x8 label maps; `bias` is the chance a pixel is right."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(classes, (images, 8, 8), generator=generator)
    noise = torch.randint(classes, (images, 8, 8), generator=generator)
    right = torch.rand(images, 8, 8, generator=generator) < bias
    pred = torch.where(right, target, noise)
    return torch.stack([confusion_matrix(pred[i], target[i], classes) for i in range(images)])


def naive_bootstrap(a, b, resamples, seed, confidence=0.95):
    """One resample at a time: sum the drawn images' matrices, per-class IoU by a loop, NaN-mean."""
    def miou(matrix):
        ious = []
        for c in range(matrix.shape[0]):
            union = matrix[c, :].sum() + matrix[:, c].sum() - matrix[c, c]
            if union > 0:
                ious.append(matrix[c, c] / union)
        return sum(ious) / len(ious)

    a, b = a.numpy(), b.numpy()
    differences = []
    for block in resample_batches(len(a), resamples, seed):
        for row in block.numpy():
            differences.append(miou(a[row].sum(0)) - miou(b[row].sum(0)))
    tail = 100 * (1 - confidence) / 2
    return np.percentile(differences, [tail, 100 - tail])


def test_bootstrap_matches_a_naive_loop_with_the_same_seed():
    a, b = random_confusions(30, 4, seed=1, bias=0.4), random_confusions(30, 4, seed=2, bias=0.35)
    interval = bootstrap_miou_difference(a, b, resamples=200, seed=7, chunk=37)
    low, high = naive_bootstrap(a, b, 200, 7)
    assert interval.low == pytest.approx(low, abs=1e-12) and interval.high == pytest.approx(high, abs=1e-12)
    whole = metrics_from_confusion(a.sum(0))["mIoU"] - metrics_from_confusion(b.sum(0))["mIoU"]
    assert interval.difference == pytest.approx(whole, abs=1e-12)


def test_bootstrap_of_identical_runs_is_zero_and_of_a_clearly_better_run_excludes_zero():
    a = random_confusions(40, 3, seed=3, bias=0.3)
    same = bootstrap_miou_difference(a, a.clone(), resamples=300, seed=0)
    assert same.difference == 0 and same.low == 0 and same.high == 0 and not same.excludes_zero
    better = random_confusions(40, 3, seed=4, bias=0.9)
    gain = bootstrap_miou_difference(better, a, resamples=300, seed=0)
    assert gain.low > 0 and gain.excludes_zero


def test_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(UserError, match="same shape|one shape"):
        bootstrap_miou_difference(torch.zeros(3, 2, 2), torch.zeros(4, 2, 2))
    with pytest.raises(UserError, match="confidence"):
        bootstrap_miou_difference(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), confidence=1.5)


def test_miou_of_confusions_equals_the_metrics_module():
    matrices = random_confusions(5, 4, seed=5, bias=0.5)
    for matrix in matrices:
        assert float(miou_of_confusions(matrix)) == pytest.approx(metrics_from_confusion(matrix)["mIoU"], abs=1e-12)


def test_per_image_confusion_places_each_image_in_its_row():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(3, (5, 6, 7), generator=generator)
    target[0, :2] = 255
    pred = torch.randint(3, (5, 6, 7), generator=generator)
    per_image, total = PerImageConfusion(3, num_images=5), ConfusionMatrix(3)
    order = [[3, 0], [4, 1, 2]]  # batches holding the images out of order, as evaluate() may give them
    for indices in order:
        per_image.index_batch({"index": indices})
        per_image.update(pred[indices], target[indices])
        total.update(pred[indices], target[indices])
    for i in range(5):
        assert torch.equal(per_image.matrices[i], confusion_matrix(pred[i], target[i], 3))
    assert torch.equal(per_image.matrices.sum(0), total.matrix)
    sequential = PerImageConfusion(3, num_images=5)
    sequential.update(pred[:2], target[:2])
    sequential.update(pred[2:], target[2:])
    assert torch.equal(sequential.matrices, per_image.matrices)
    with pytest.raises(UserError, match="rows"):
        sequential.update(pred[:1], target[:1])  # a sixth image
