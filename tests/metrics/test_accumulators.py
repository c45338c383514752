"""Properties every accumulator must have (merge, order, batching, checkpoints) and the shared input view."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trustseg.errors import UserError
from trustseg.metrics import BoundaryIoU, ConfusionMatrix, PerImageIoU, Predictions

IGNORE = 255
METRICS = [ConfusionMatrix, PerImageIoU, BoundaryIoU]


@st.composite
def streams(draw):
    """A few same-size images as (pred, target) pairs, (B, H, W) each, with some ignored pixels."""
    K = draw(st.integers(1, 5))
    images = draw(st.integers(2, 6))
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_fraction = draw(st.sampled_from([0.0, 0.2, 1.0]))
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, (images, height, width), generator=g)
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.5, target, torch.randint(0, K, target.shape, generator=g)
    )
    target[torch.rand(target.shape, generator=g) < ignore_fraction] = IGNORE
    return K, pred, target


def state_of(metric):
    return metric.state_dict()["state"]


def assert_same_state(a, b):
    for name, value in state_of(a).items():
        other = state_of(b)[name]
        if value.is_floating_point():  # per-image sums: float addition order differs
            torch.testing.assert_close(value, other, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(value, other), name


def fed(cls, K, pred, target, batch_size=1):
    metric = cls(K)
    for start in range(0, len(pred), batch_size):
        metric.update(pred[start : start + batch_size], target[start : start + batch_size])
    return metric


@pytest.mark.parametrize("cls", METRICS)
@settings(max_examples=25, deadline=None)
@given(data=streams(), split=st.integers(0, 6))
def test_merge_of_two_halves_equals_whole_stream(cls, data, split):
    K, pred, target = data
    split = min(split, len(pred))
    first, second = fed(cls, K, pred[:split], target[:split]), fed(cls, K, pred[split:], target[split:])
    assert first.merge(second) is first
    assert_same_state(first, fed(cls, K, pred, target))


@pytest.mark.parametrize("cls", METRICS)
@settings(max_examples=25, deadline=None)
@given(data=streams(), seed=st.integers(0, 1000))
def test_image_order_does_not_matter(cls, data, seed):
    K, pred, target = data
    order = torch.randperm(len(pred), generator=torch.Generator().manual_seed(seed))
    assert_same_state(fed(cls, K, pred, target), fed(cls, K, pred[order], target[order]))


@pytest.mark.parametrize("cls", METRICS)
@settings(max_examples=25, deadline=None)
@given(data=streams(), batch_size=st.integers(2, 6))
def test_batch_size_does_not_matter(cls, data, batch_size):
    K, pred, target = data
    assert_same_state(fed(cls, K, pred, target), fed(cls, K, pred, target, batch_size))


@pytest.mark.parametrize("cls", METRICS)
@settings(max_examples=10, deadline=None)
@given(data=streams())
def test_state_dict_round_trip(cls, data):
    K, pred, target = data
    metric = fed(cls, K, pred, target, batch_size=2)
    buffer = io.BytesIO()
    torch.save(metric.state_dict(), buffer)
    buffer.seek(0)
    restored = cls(K)
    restored.load_state_dict(torch.load(buffer))
    assert_same_state(metric, restored)
    torch.testing.assert_close(restored.compute(), metric.compute(), equal_nan=True)
    metric.update(pred, target)  # the snapshot is a copy, not a view of the live state
    assert_same_state(restored, fed(cls, K, pred, target, batch_size=2))


@pytest.mark.parametrize("cls", METRICS)
def test_reset_returns_to_a_fresh_state(cls):
    pred = torch.randint(0, 3, (2, 6, 6))
    metric = cls(3)
    metric.update(pred, pred)
    metric.reset()
    assert_same_state(metric, cls(3))


@pytest.mark.parametrize("cls", METRICS)
@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 4)])
def test_empty_batches_change_nothing(cls, shape):
    metric = cls(3)
    metric.update(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long))
    metric.update(torch.zeros(shape[0], 3, *shape[1:]), torch.zeros(shape, dtype=torch.long))
    assert_same_state(metric, cls(3))


@pytest.mark.parametrize("cls", METRICS)
def test_all_reduce_without_a_process_group_is_a_no_op(cls):
    pred = torch.randint(0, 3, (2, 6, 6))
    metric = cls(3)
    metric.update(pred, pred)
    before = metric.state_dict()["state"]
    assert metric.all_reduce() is metric
    for name, value in before.items():
        assert torch.equal(value, state_of(metric)[name])


@pytest.mark.parametrize("cls", METRICS)
def test_a_reduced_accumulator_refuses_a_second_sum_and_more_batches_until_reset(cls):
    pred = torch.randint(0, 3, (2, 6, 6))
    metric = cls(3)
    metric.update(pred, pred)
    metric.all_reduce()
    with pytest.raises(UserError, match="already summed"):
        metric.all_reduce()
    with pytest.raises(UserError, match="already summed"):
        metric.update(pred, pred)
    metric.reset()
    metric.update(pred, pred)
    assert metric.all_reduce() is metric


@pytest.mark.parametrize(
    "a,b",
    [
        (ConfusionMatrix(3), ConfusionMatrix(4)),
        (ConfusionMatrix(3), ConfusionMatrix(3, ignore_index=-1)),
        (ConfusionMatrix(3), PerImageIoU(3)),
        (BoundaryIoU(3), BoundaryIoU(3, dilation_ratio=0.01)),
    ],
)
def test_incompatible_accumulators_are_refused(a, b):
    with pytest.raises(UserError, match="cannot combine"):
        a.merge(b)
    with pytest.raises(UserError, match="cannot combine"):
        a.load_state_dict(b.state_dict())


@pytest.mark.parametrize("cls", METRICS)
def test_ignore_index_inside_the_classes_is_refused(cls):
    with pytest.raises(UserError, match="ignore_index 2 is a class index"):
        cls(5, ignore_index=2)


def test_one_predictions_view_feeds_every_metric():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 10, 12, generator=g)
    target = torch.randint(0, 4, (2, 10, 12), generator=g)
    preds = Predictions(logits)
    assert torch.equal(preds.pred, logits.argmax(1))
    assert preds.pred is preds.pred and preds.probs is preds.probs  # computed once, then shared
    torch.testing.assert_close(preds.probs, logits.softmax(1))
    for cls in METRICS:
        shared, raw = cls(4), cls(4)
        shared.update(preds, target)
        raw.update(logits, target)
        assert_same_state(shared, raw)


def test_hard_predictions_have_no_logits_or_probabilities():
    preds = Predictions(torch.zeros(1, 3, 3, dtype=torch.long))
    assert preds.logits is None
    with pytest.raises(UserError, match="hard predictions"):
        _ = preds.probs


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_are_refused(value):
    logits = torch.randn(1, 3, 4, 4)
    logits[0, 1, 2, 2] = value
    with pytest.raises(UserError, match="NaN or inf"):
        Predictions(logits)
    logits[0, :, 2, 2] = float("-inf")
    with pytest.raises(UserError, match="NaN or inf"):
        Predictions(logits)


def test_a_single_minus_inf_logit_is_a_zero_probability():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = float("-inf")
    assert Predictions(logits).probs[0, 0].eq(0).all()


@pytest.mark.parametrize(
    "outputs,target,message",
    [
        (torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), "upsample the logits"),
        (torch.randn(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), "5 channels but the metric expects 3"),
        (torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4), "integer tensor"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), "shape"),
        (torch.full((1, 4, 4), 3), torch.zeros(1, 4, 4, dtype=torch.long), r"3\.\.3, outside \[0, 3\)"),
        (torch.full((1, 4, 4), -1), torch.zeros(1, 4, 4, dtype=torch.long), "outside"),
        (torch.randn(3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long), r"\(B, K, H, W\)"),
        (torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long), r"\(B, H, W\)"),
        (torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.long), "float logits or integer"),
    ],
)
@pytest.mark.parametrize("cls", METRICS)
def test_bad_inputs_raise_user_errors(cls, outputs, target, message):
    with pytest.raises(UserError, match=message):
        cls(3).update(outputs, target)
