"""Pixel selection of uncertainty-guided augmentation, on hand-made label and entropy maps."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from trustseg.augment.selection import (
    class_entropies, pixel_entropy, rank_images, select, square_side,
)
from trustseg.engine.uncertainty_maps import entropy as normalised_entropy
from trustseg.errors import UserError

IGNORE = 255


def maps():
    """A 4 x 5 image (20 px): class 0 x 8 (entropy 0.1), class 1 x 6 (0.9), class 2 x 3 (0.5), ignore x 3."""
    labels = torch.tensor([
        [0, 0, 0, 0, 1],
        [0, 0, 0, 0, 1],
        [2, 2, 2, 1, 1],
        [IGNORE, IGNORE, IGNORE, 1, 1],
    ])
    table = {0: 0.1, 1: 0.9, 2: 0.5, IGNORE: 5.0}  # ignore pixels are the most uncertain but count nowhere
    entropy = torch.tensor([[table[int(v)] for v in row] for row in labels], dtype=torch.float32)
    return labels, entropy


def test_paper_entropy_matches_a_hand_computation_and_the_normalised_map():
    probs = torch.tensor([0.5, 0.25, 0.25, 0.0]).view(1, 4, 1, 1)
    expected = -(0.5 * math.log(0.5 + 1e-6) + 2 * 0.25 * math.log(0.25 + 1e-6))
    assert pixel_entropy(probs).item() == pytest.approx(expected, rel=1e-6)
    probs = torch.softmax(torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0)), 1)
    # within the 1e-6 shift of the logarithm, nats = normalised entropy * ln K
    torch.testing.assert_close(pixel_entropy(probs), normalised_entropy(probs) * math.log(5), atol=1e-5, rtol=0)


def test_class_means_skip_ignore_and_absent_classes():
    labels, entropy = maps()
    found = class_entropies(labels, entropy, num_classes=4)  # class 3 is absent
    assert [(c.class_id, c.pixels) for c in found] == [(0, 8), (1, 6), (2, 3)]
    assert [c.mean_entropy for c in found] == pytest.approx([0.1, 0.9, 0.5])


def test_entropy_high_adds_whole_classes_until_the_union_strictly_exceeds_tau():
    labels, entropy = maps()
    # tau * H * W = 0.25 * 20 = 5: class 1 (6 px) alone exceeds it
    assert select(labels, entropy, num_classes=4, tau=0.25, selector="entropy-high").classes == (1,)
    # 0.3 * 20 = 6: 6 px is not strictly more, so class 2 joins (9 px, overshooting 6)
    chosen = select(labels, entropy, num_classes=4, tau=0.3, selector="entropy-high")
    assert chosen.classes == (1, 2)
    assert int(chosen.preserve_mask(labels).sum()) == 9
    # the score is the area-weighted mean of the classes' mean entropies
    assert chosen.score == pytest.approx((6 * 0.9 + 3 * 0.5) / 9)


def test_entropy_low_takes_the_other_end_and_overshoots_with_a_large_class():
    labels, entropy = maps()
    chosen = select(labels, entropy, num_classes=4, tau=0.05, selector="entropy-low")
    assert chosen.classes == (0,)  # 8 px > 1 px: the crossing class stays whole
    assert int(chosen.preserve_mask(labels).sum()) == 8


def test_when_no_union_exceeds_tau_every_labelled_class_is_kept_and_ignore_never():
    labels, entropy = maps()
    chosen = select(labels, entropy, num_classes=4, tau=0.9, selector="entropy-high")
    assert chosen.classes == (1, 2, 0)
    mask = chosen.preserve_mask(labels)
    assert torch.equal(mask, labels != IGNORE)


def test_equal_mean_entropies_are_taken_in_increasing_class_id():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    entropy = torch.full((2, 4), 0.7)
    entropy[labels == 3] = 0.1
    assert select(labels, entropy, num_classes=4, tau=0.1, selector="entropy-high").classes == (0,)
    assert select(labels, entropy, num_classes=4, tau=0.3, selector="entropy-high").classes == (0, 1)
    assert select(labels, entropy, num_classes=4, tau=0.3, selector="entropy-low").classes == (3, 0)


def test_an_image_without_labelled_pixels_preserves_nothing():
    labels = torch.full((3, 3), IGNORE)
    chosen = select(labels, torch.ones(3, 3), num_classes=2, tau=0.1, selector="entropy-high")
    assert chosen.classes == () and not chosen.preserve_mask(labels).any() and math.isnan(chosen.score)


def test_random_classes_are_seeded_and_follow_the_same_threshold():
    labels, entropy = maps()
    runs = [select(labels, None, num_classes=4, tau=0.3, selector="no-model",
                   generator=torch.Generator().manual_seed(s)) for s in range(20)]
    again = select(labels, None, num_classes=4, tau=0.3, selector="no-model",
                   generator=torch.Generator().manual_seed(3))
    assert again.classes == runs[3].classes
    counts = {0: 8, 1: 6, 2: 3}
    for run in runs:
        areas = np.cumsum([counts[c] for c in run.classes])
        assert areas[-1] > 6 and (len(areas) == 1 or areas[-2] <= 6)  # stops at the first crossing
        assert math.isnan(run.score)
    assert len({run.classes for run in runs}) > 1  # the order really is random
    scored = select(labels, entropy, num_classes=4, tau=0.3, selector="random-class",
                    generator=torch.Generator().manual_seed(3))
    assert scored.classes == runs[3].classes and not math.isnan(scored.score)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.01, 0.99), st.integers(0, 10_000))
def test_random_region_is_the_smallest_square_reaching_tau_and_lies_inside(height, width, tau, seed):
    labels = torch.zeros(height, width, dtype=torch.long)
    chosen = select(labels, None, num_classes=1, tau=tau, selector="random-region",
                    generator=torch.Generator().manual_seed(seed))
    top, left, box_h, box_w = chosen.box
    assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
    assert box_h * box_w >= tau * height * width - 1e-9
    if box_h == box_w:  # a square unless the image is too narrow for one: then no smaller one reaches tau
        assert (box_h - 1) ** 2 < tau * height * width
    else:
        assert min(box_h, box_w) == min(height, width)
    assert int(chosen.preserve_mask(labels).sum()) == box_h * box_w


def test_random_region_reports_the_classes_inside_it():
    labels = torch.tensor([[0, 0, 1, 1]] * 4)
    assert square_side(0.25, 4, 4) == (2, 2)
    chosen = select(labels, None, num_classes=2, tau=0.25, selector="random-region",
                    generator=torch.Generator().manual_seed(0))
    top, left, _, _ = chosen.box
    assert set(chosen.classes) == set(labels[top: top + 2, left: left + 2].unique().tolist())


def test_ranking_is_by_decreasing_score_ties_by_index_nan_last():
    assert rank_images([0.2, math.nan, 0.9, 0.2, 0.5]) == [2, 4, 0, 3, 1]


@pytest.mark.parametrize("tau", [0, 1, -0.1, 1.5, float("nan")])
def test_tau_outside_the_open_unit_interval_is_refused(tau):
    labels, entropy = maps()
    with pytest.raises(UserError, match="--tau"):
        select(labels, entropy, num_classes=4, tau=tau, selector="entropy-high")


def test_unknown_selector_is_refused():
    labels, entropy = maps()
    with pytest.raises(UserError, match="--selector 'best'"):
        select(labels, entropy, num_classes=4, tau=0.1, selector="best")


def test_selection_equals_a_naive_reference_on_random_maps():
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        labels = torch.randint(0, 6, (7, 9), generator=generator)
        labels[labels == 5] = IGNORE
        entropy = torch.rand(7, 9, generator=generator)
        tau = float(torch.rand(1, generator=generator)) * 0.9 + 0.05
        got = select(labels, entropy, num_classes=5, tau=tau, selector="entropy-high")
        # reference: plain Python loops over pixels
        sums, counts = {}, {}
        for value, h in zip(labels.flatten().tolist(), entropy.flatten().tolist()):
            if value != IGNORE:
                sums[value] = sums.get(value, 0.0) + h
                counts[value] = counts.get(value, 0) + 1
        order = sorted(counts, key=lambda c: (-sums[c] / counts[c], c))
        expected, area = [], 0
        for c in order:
            expected.append(c)
            area += counts[c]
            if area > tau * 63:
                break
        assert got.classes == tuple(expected)
        assert got.score == pytest.approx(sum(sums[c] for c in expected) / sum(counts[c] for c in expected))


def test_selection_from_a_hand_made_probability_map():
    # class 0: confident (p = 1, 0, 0); class 1: torn between two classes (0.5, 0.5, 0); class 2: uniform
    labels = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [2, 0, 0, 0]])
    rows = {0: [1.0, 0.0, 0.0], 1: [0.5, 0.5, 0.0], 2: [1 / 3, 1 / 3, 1 / 3]}
    probs = torch.tensor([[rows[int(v)] for v in row] for row in labels]).permute(2, 0, 1)[None]
    entropy = pixel_entropy(probs)[0]
    # 12 px, tau 0.05 -> 0.6 px: the uniform class (ln 3 nats) alone, though it has a single pixel
    assert select(labels, entropy, num_classes=3, tau=0.05, selector="entropy-high").classes == (2,)
    chosen = select(labels, entropy, num_classes=3, tau=0.1, selector="entropy-high")
    assert chosen.classes == (2, 1)  # 1 px is not more than 1.2 px: the next class (ln 2 nats) joins
    assert chosen.score == pytest.approx((math.log(3) + 3 * math.log(2)) / 4, abs=1e-5)
    assert select(labels, entropy, num_classes=3, tau=0.1, selector="entropy-low").classes == (0,)
