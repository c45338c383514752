"""UncertaintyHistogram against the Mann-Whitney U statistic (scipy), torchmetrics' AUROC and naive NumPy AURC."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import mannwhitneyu
from torchmetrics.functional.classification import binary_auroc

from trustseg.errors import UserError
from trustseg.metrics import UncertaintyHistogram, error_auroc, risk_coverage, uncertainty_bin_edges
from trustseg.engine.uncertainty_maps import UNCERTAINTY

IGNORE = 255


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# Oracles: explicit definitions over single pixels


def exact_auroc(u, wrong):
    """P(u_wrong > u_correct) + P(tie) / 2: the Mann-Whitney U statistic over (wrong, correct) pairs."""
    return mannwhitneyu(u[wrong], u[~wrong]).statistic / (wrong.sum() * (~wrong).sum())


def sorted_aurc(u, wrong):
    """Rank by increasing u (stable); risk at i = errors among the first i / i; AURC = mean risk."""
    errors = np.cumsum(wrong[np.argsort(u, kind="stable")])
    return np.mean(errors / np.arange(1, len(u) + 1))


def expected_aurc(u, wrong):
    """AURC averaged over every order of tied values, position by position (no closed form)."""
    risks, seen, errors = [], 0, 0
    for value in np.unique(u):
        group = wrong[u == value]
        n, w = len(group), int(group.sum())
        risks += [(errors + j * w / n) / (seen + j) for j in range(1, n + 1)]
        seen, errors = seen + n, errors + w
    return np.mean(risks)


def optimal_aurc(wrong):
    return sorted_aurc(wrong.astype(float), wrong)


def msp_logits(u):
    """Float64 logits (1, 2, 1, N) whose softmax is (1 - u, u): msp = u, class 0 predicted (u < 0.5)."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.stack((torch.log1p(-u), torch.log(u)))[None, :, None, :]


def bin_centres(num_bins, low=1e-6, high=0.49):
    edges = uncertainty_bin_edges(num_bins).numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    return centres[(centres >= low) & (centres <= high)]


def fed(u, wrong, num_bins=2048, ignored=None):
    """An accumulator fed pixels of msp `u`, wrong where `wrong` (target 1), ignored where `ignored`."""
    target = torch.as_tensor(wrong, dtype=torch.int64)
    if ignored is not None:
        target[torch.as_tensor(ignored)] = IGNORE
    metric = UncertaintyHistogram(2, num_bins=num_bins)
    metric.update(msp_logits(u), target[None, None])
    return metric.compute()


# ---------------------------------------------------------------------------------------------------
# The histogram functions on counts per bin


@pytest.mark.parametrize("seed", range(4))
def test_auroc_from_counts_is_the_tie_aware_auroc(seed):
    g = np.random.default_rng(seed)
    bins = g.integers(1, 30)
    correct, wrong = g.integers(0, 20, bins), g.integers(0, 20, bins)
    correct[0] += 1
    wrong[-1] += 1
    scores = np.repeat(np.arange(bins), correct + wrong).astype(float)
    is_wrong = np.concatenate([np.r_[np.zeros(c, bool), np.ones(w, bool)] for c, w in zip(correct, wrong)])
    auroc, bound = error_auroc(torch.tensor(correct), torch.tensor(wrong))
    assert auroc == pytest.approx(exact_auroc(scores, is_wrong), abs=1e-12)
    torchmetrics = binary_auroc(torch.tensor(scores / bins), torch.tensor(is_wrong).long(), thresholds=None)
    assert auroc == pytest.approx(float(torchmetrics), abs=1e-6)  # torchmetrics answers in float32
    assert bound == pytest.approx((correct * wrong).sum() / (2 * correct.sum() * wrong.sum()), abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_aurc_equals_sorting_when_no_bin_mixes_correct_and_wrong(seed):
    g = np.random.default_rng(seed)
    bins = g.integers(1, 40)
    counts = g.integers(0, 30, bins)
    is_wrong_bin = g.random(bins) < 0.4
    correct, wrong = np.where(is_wrong_bin, 0, counts), np.where(is_wrong_bin, counts, 0)
    scores = np.repeat(np.arange(bins), counts)
    is_wrong = np.repeat(is_wrong_bin, counts)
    aurc, optimal, bound = risk_coverage(torch.tensor(correct), torch.tensor(wrong))
    assert aurc == pytest.approx(sorted_aurc(scores, is_wrong), abs=1e-12)
    assert optimal == pytest.approx(optimal_aurc(is_wrong), abs=1e-12)
    assert bound == 0


@pytest.mark.parametrize("correct,wrong", [([1, 2, 0], [1, 1, 2]), ([2, 0, 1], [2, 1, 1]), ([0, 3], [3, 0])])
def test_aurc_is_the_mean_over_every_order_inside_the_bins(correct, wrong):
    groups = [sorted(set(itertools.permutations([0] * c + [1] * w))) for c, w in zip(correct, wrong)]
    values = [sorted_aurc(np.arange(sum(correct + wrong)), np.array(sum(order, ()), bool))
              for order in itertools.product(*groups)]
    aurc, _, bound = risk_coverage(torch.tensor(correct), torch.tensor(wrong))
    assert aurc == pytest.approx(np.mean(values), abs=1e-12)
    assert max(abs(v - aurc) for v in values) <= bound + 1e-12


def test_counts_without_both_outcomes():
    assert all(math.isnan(v) for v in error_auroc(torch.tensor([3, 1]), torch.tensor([0, 0])))
    assert risk_coverage(torch.tensor([3, 1]), torch.tensor([0, 0])) == (0.0, 0.0, 0.0)
    aurc, optimal, _ = risk_coverage(torch.tensor([0, 0]), torch.tensor([2, 5]))
    assert aurc == pytest.approx(1) and optimal == pytest.approx(1)
    assert all(math.isnan(v) for v in risk_coverage(torch.zeros(3), torch.zeros(3)))


@pytest.mark.parametrize("num_bins", [1, 64, 2048])
def test_bin_edges_are_fine_in_absolute_and_relative_terms(num_bins):
    edges = uncertainty_bin_edges(num_bins)
    assert edges[0] == 0 and edges[-1] == 1 and len(edges) == 2 * num_bins + 1
    widths = edges.diff()
    assert bool((widths > 0).all()) and float(widths.max()) <= 1 / num_bins + 1e-15
    above = edges[edges >= 1e-12]
    assert float((above[1:] / above[:-1]).max()) <= 10 ** (12 / num_bins) * (1 + 1e-12)


# ---------------------------------------------------------------------------------------------------
# The accumulator on pixels


def test_values_on_bin_centres_match_the_pixel_definitions():
    g = np.random.default_rng(0)
    u = g.choice(bin_centres(2048), 3000)
    u[:1000] = g.choice(u[1000:1100], 1000)  # many ties, mixing correct and wrong pixels
    wrong = g.random(3000) < u * 1.5
    ignored = g.random(3000) < 0.1
    got = fed(u, wrong, ignored=ignored)
    keep = ~ignored
    assert got["AUROC_msp"] == pytest.approx(exact_auroc(u[keep], wrong[keep]), abs=1e-9)
    assert got["AURC_msp"] == pytest.approx(expected_aurc(u[keep], wrong[keep]), abs=1e-9)
    assert got["EAURC_msp"] == pytest.approx(expected_aurc(u[keep], wrong[keep]) - optimal_aurc(wrong[keep]), abs=1e-9)
    assert got["histogram_error"]["AUROC_msp"] > 0  # ties were there, and they are exact nonetheless


@pytest.mark.parametrize("num_bins", [16, 64])
def test_continuous_values_are_within_the_reported_bounds(num_bins):
    g = np.random.default_rng(num_bins)
    u = g.uniform(1e-6, 0.49, 2000)
    wrong = g.random(2000) < u * 1.5
    got = fed(u, wrong, num_bins=num_bins)
    errors = got["histogram_error"]
    # uniform values: the AUROC bound is about sum_b width_b^2 / (2 * 0.49^2) <= half the widest bin / 0.49
    assert 0 < errors["AUROC_msp"] <= 1.1 / num_bins
    assert abs(got["AUROC_msp"] - exact_auroc(u, wrong)) <= errors["AUROC_msp"]
    assert abs(got["AURC_msp"] - sorted_aurc(u, wrong)) <= errors["AURC_msp"]
    assert abs(got["EAURC_msp"] - (sorted_aurc(u, wrong) - optimal_aurc(wrong))) <= errors["AURC_msp"]


def test_confident_pixels_are_told_apart_by_the_log_spaced_bins():
    # all above 1 - 1/2048 in confidence: one bin for equal-width bins, ranked exactly here
    u = np.r_[np.full(50, 1e-7), np.full(5, 3e-6), np.full(50, 1e-5)]
    wrong = np.r_[np.zeros(50, bool), np.ones(5, bool), np.ones(50, bool)]
    got = fed(u, wrong)
    assert got["AUROC_msp"] == 1.0 and got["histogram_error"]["AUROC_msp"] == 0
    assert got["EAURC_msp"] == pytest.approx(0, abs=1e-15)


def test_each_measure_ranks_by_its_own_values():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    metric = UncertaintyHistogram(4, measures=tuple(UNCERTAINTY))
    metric.update(logits, target)
    got = metric.compute()
    wrong = (logits.argmax(1) != target).flatten().numpy()
    for name, measure in UNCERTAINTY.items():
        u = measure(logits.softmax(1)).flatten().numpy()
        bound = got["histogram_error"][f"AUROC_{name}"]
        assert abs(got[f"AUROC_{name}"] - exact_auroc(u, wrong)) <= bound + 1e-12, name
        assert abs(got[f"AURC_{name}"] - sorted_aurc(u, wrong)) <= got["histogram_error"][f"AURC_{name}"] + 1e-12
        single = UncertaintyHistogram(4, measures=(name,))
        single.update(logits, target)
        assert single.compute()[f"AURC_{name}"] == got[f"AURC_{name}"]


def test_no_labelled_or_no_wrong_pixels():
    ignored = fed(np.full(4, 0.1), np.zeros(4, bool), ignored=np.ones(4, bool))
    assert all(math.isnan(ignored[f"{key}_msp"]) for key in ("AUROC", "AURC", "EAURC"))
    perfect = fed(np.full(4, 0.1), np.zeros(4, bool))
    assert math.isnan(perfect["AUROC_msp"]) and perfect["AURC_msp"] == 0 and perfect["EAURC_msp"] == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"measures": ("variance",)}, "expected distinct names from entropy, msp, margin, mc-dropout, mutual-information"),
        ({"measures": ()}, "expected distinct names"),
        ({"measures": ("msp", "msp")}, "expected distinct names"),
        ({"num_bins": 0}, "num_bins must be a positive integer"),
        ({"ignore_index": 1}, "ignore_index 1 is a class index"),
    ],
)
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        UncertaintyHistogram(3, **kwargs)


def test_bad_inputs_are_refused():
    metric = UncertaintyHistogram(3)
    with pytest.raises(UserError, match="hard predictions"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(UserError, match=r"label values \{7\}"):
        metric.update(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(UserError, match="cannot combine"):
        metric.merge(UncertaintyHistogram(3, measures=("entropy",)))


def test_a_single_name_is_one_measure():
    assert UncertaintyHistogram(3, measures="margin").measures == ("margin",)


# ---------------------------------------------------------------------------------------------------
# Streaming properties


@st.composite
def streams(draw):
    """A few same-size images: float32 logits (B, K, H, W) and targets (B, H, W) with ignored pixels."""
    K = draw(st.integers(1, 4))
    images = draw(st.integers(2, 5))
    height, width = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(images, K, height, width, generator=g) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    target = torch.randint(0, K, (images, height, width), generator=g)
    target[torch.rand(target.shape, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    return K, logits, target


def fed_stream(K, logits, target, batch_size=1):
    metric = UncertaintyHistogram(K, measures=("entropy", "msp"), num_bins=64)
    for start in range(0, len(logits), batch_size):
        metric.update(logits[start : start + batch_size], target[start : start + batch_size])
    return metric


def hist(metric):
    return metric.state_dict()["state"]["hist"]


@settings(max_examples=25, deadline=None)
@given(data=streams(), split=st.integers(0, 5))
def test_merge_of_two_halves_equals_the_whole_stream(data, split):
    K, logits, target = data
    first, second = fed_stream(K, logits[:split], target[:split]), fed_stream(K, logits[split:], target[split:])
    assert torch.equal(hist(first.merge(second)), hist(fed_stream(K, logits, target)))


@settings(max_examples=25, deadline=None)
@given(data=streams(), seed=st.integers(0, 1000), batch_size=st.integers(2, 5))
def test_image_order_and_batch_size_do_not_matter(data, seed, batch_size):
    K, logits, target = data
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    whole = hist(fed_stream(K, logits, target))
    assert torch.equal(whole, hist(fed_stream(K, logits[order], target[order], batch_size)))
    assert int(whole.sum()) == 2 * int((target != IGNORE).sum())  # every labelled pixel once per measure


@settings(max_examples=10, deadline=None)
@given(data=streams())
def test_state_dict_round_trip(data):
    K, logits, target = data
    metric = fed_stream(K, logits, target, batch_size=2)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = UncertaintyHistogram(K, measures=("entropy", "msp"), num_bins=64)
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(hist(restored), hist(metric))
    np.testing.assert_equal(restored.compute(), metric.compute())


def test_mc_measures_read_the_maps_their_batch_carries():
    """A map passed as `Predictions.maps` is scored like the same values computed from the softmax."""
    from trustseg.metrics import Predictions

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 9, 11, generator=g) * 3
    target = torch.randint(0, 3, (2, 9, 11), generator=g)
    maps = {"mc-dropout": UNCERTAINTY["msp"](logits.softmax(1)), "mutual-information": UNCERTAINTY["entropy"](logits.softmax(1))}
    metric = UncertaintyHistogram(3, measures=("msp", "entropy", "mc-dropout", "mutual-information"))
    metric.update(Predictions(logits, maps), target)
    got = metric.compute()
    for native, carried in (("msp", "mc-dropout"), ("entropy", "mutual-information")):
        for key in ("AUROC", "AURC", "EAURC"):
            assert got[f"{key}_{carried}"] == got[f"{key}_{native}"]
    with pytest.raises(UserError, match="needs MC-dropout passes"):
        UncertaintyHistogram(3, measures=("mc-dropout",)).update(logits, target)
    with pytest.raises(UserError, match=r"shape \(2, 9\), expected \(2, 9, 11\)"):
        UncertaintyHistogram(3, measures=("mc-dropout",)).update(Predictions(logits, {"mc-dropout": maps["mc-dropout"][..., 0]}), target)
