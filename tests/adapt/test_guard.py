"""The safety guard on constructed streams, and the adapting predictor's resets."""

import math

import pytest
import torch
from torch import nn

from trustseg.adapt.losses import pixel_entropy
from trustseg.adapt.guard import CollapseGuard, GuardConfig
from trustseg.adapt.predictor import AdaptConfig, AdaptingPredictor
from trustseg.errors import UserError

K = 5


def varied(seed):
    """(1, 4, 4) predictions using every class about equally."""
    return torch.randint(0, K, (1, 4, 4), generator=torch.Generator().manual_seed(seed))


def first_reason(guard, stream):
    for number, (entropy, predictions) in enumerate(stream, 1):
        reason = guard.observe(entropy, predictions)
        if reason is not None:
            return number, reason
    return None


def test_a_healthy_stream_never_trips():
    guard = CollapseGuard(K, GuardConfig(window=4))
    stream = [(1.0 + 0.1 * math.sin(i), varied(i)) for i in range(60)]
    assert first_reason(guard, stream) is None


def test_rising_entropy_trips_once_the_latest_window_clears_the_reference():
    guard = CollapseGuard(K, GuardConfig(window=4, max_entropy_rise=0.5))
    stream = [(0.8, varied(i)) for i in range(4)] + [(1.0, varied(i)) for i in range(4, 8)] + [(2.0, varied(i)) for i in range(8, 20)]
    # latest window means: batches 5-8 give 1.0 (< 1.2), 6-9 give 1.25 > 1.5 x 0.8 = 1.2
    number, reason = first_reason(guard, stream)
    assert number == 9 and reason.startswith("entropy rise")


def test_collapsing_entropy_trips_sar_rule():
    guard = CollapseGuard(K, GuardConfig(window=4))
    floor = 0.2 / math.log(1000) * math.log(K)
    assert guard.entropy_floor == pytest.approx(floor)
    stream = [(1.0, varied(i)) for i in range(3)] + [(0.0, varied(i)) for i in range(3, 60)]
    number, reason = first_reason(guard, stream)
    # EMA after n zero batches: 1.0 * 0.9^n; first below the floor at n = ceil(log(floor) / log(0.9))
    assert number == 3 + math.ceil(math.log(floor) / math.log(0.9))
    assert reason.startswith("entropy collapse")


def test_prediction_collapsing_to_one_class_trips():
    guard = CollapseGuard(K, GuardConfig(window=4, max_class_share=0.9))
    one_class = torch.full((1, 4, 4), 3)
    stream = [(1.0, varied(0)), (1.0, varied(1))] + [(1.0, one_class)] * 10
    number, reason = first_reason(guard, stream)
    # window of 4 batches x 16 pixels: three collapsed batches give (48 + ~3) / 64 < 0.9, four give 1.0
    assert number == 6 and reason.startswith("class collapse: class 3")
    guard.restart()
    assert guard.observe(1.0, one_class) is None  # a fresh window must fill first


def test_bad_guard_settings_are_user_errors():
    with pytest.raises(UserError, match="guard window"):
        GuardConfig(window=0)
    with pytest.raises(UserError, match="guard settings"):
        GuardConfig(max_class_share=1.5)


def test_runaway_adaptation_is_reset_to_the_source_with_its_reason(one_thread):
    """TENT with a huge learning rate on a tiny model drives every pixel to one confident class; the guard
    resets it and the parameters return to the source values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, K, 1)).eval()
    generator = torch.Generator().manual_seed(0)
    stream = [torch.randn(1, 3, 8, 8, generator=generator) for _ in range(30)]
    config = AdaptConfig(optimizer="sgd", lr=50.0, momentum=0.0, guard=GuardConfig(window=3))
    guarded = AdaptingPredictor(model, K, config)
    for images in stream:
        guarded(images)
    summary = guarded.summary()
    assert summary["resets"] >= 1 and summary["batches"] == 30
    assert set(summary["resets_by_kind"]) <= {"entropy collapse", "class collapse", "entropy rise", "non-finite loss"}
    assert all(r["reason"] for r in summary["reset_log"])
    unguarded = AdaptingPredictor(model, K, AdaptConfig(optimizer="sgd", lr=50.0, momentum=0.0, guard=None))
    for images in stream:
        unguarded(images)
    assert unguarded.summary()["resets"] == 0
    # the run without a guard did collapse: its entropy ends far below the guarded run's
    probe = stream[0]
    assert pixel_entropy(unguarded.model(probe)).mean() < guarded.guard.entropy_floor


def test_reset_restores_source_parameters_and_a_fresh_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, K, 1)).eval()
    adapter = AdaptingPredictor(model, K, AdaptConfig(lr=0.1, guard=None))
    adapter(torch.randn(2, 3, 4, 4))
    assert adapter.optimizer.state
    adapter.reset("test: by hand")
    for name, parameter in adapter.parameters.items():
        assert torch.equal(parameter, adapter.initial[name])
    assert not adapter.optimizer.state
    assert adapter.summary()["resets_by_kind"] == {"test": 1}


def test_a_non_finite_loss_resets_and_the_batch_is_predicted_by_the_source():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, K, 1)).eval()
    adapter = AdaptingPredictor(model, K, AdaptConfig(lr=0.1, guard=None))
    images = torch.randn(2, 3, 4, 4)
    adapter(images)  # one real step away from the source
    adapter.loss = lambda logits, anchor: logits.sum() * float("nan")
    logits = adapter(images)
    fresh = AdaptingPredictor(model, K, AdaptConfig(guard=None))
    torch.testing.assert_close(logits, fresh.model(images).detach())  # the source with batch statistics
    assert adapter.summary()["resets_by_kind"] == {"non-finite loss": 1}
    for name, parameter in adapter.parameters.items():
        assert torch.equal(parameter, adapter.initial[name])
