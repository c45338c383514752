import pytest

from trustseg.training.config import ScheduleConfig
from trustseg.training.schedule import lr_factor


def test_warmup_then_cosine_hits_the_end_values():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=10, warmup_start_factor=0.1, end_factor=0.05)
    factors = [lr_factor(schedule, step, total_steps=110) for step in range(111)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[5] == pytest.approx(0.1 + 0.9 * 5 / 10)  # linear ramp
    assert factors[10] == pytest.approx(1.0)  # the peak right after warmup
    assert factors[60] == pytest.approx((1 + 0.05) / 2)  # cosine midpoint, half-way through the decay
    assert factors[110] == pytest.approx(0.05)  # the end value once the budget is spent
    assert 0.05 < factors[109] < 0.0503  # the last update is just above it
    assert all(a < b for a, b in zip(factors[:10], factors[1:11], strict=False))
    assert all(a > b for a, b in zip(factors[10:-1], factors[11:], strict=False))


def test_poly_and_constant():
    poly = ScheduleConfig(kind="poly", warmup_steps=0, end_factor=0.0, power=0.9)
    assert lr_factor(poly, 0, total_steps=101) == 1.0
    assert lr_factor(poly, 50, total_steps=100) == pytest.approx(0.5**0.9)
    assert lr_factor(poly, 100, total_steps=100) == 0.0
    constant = ScheduleConfig(kind="constant", warmup_steps=4, warmup_start_factor=0.0)
    assert [lr_factor(constant, s, total_steps=10) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_time_budget_drives_the_decay():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=0, end_factor=0.0)
    assert lr_factor(schedule, 7, elapsed_s=0.0, budget_s=60.0) == 1.0
    assert lr_factor(schedule, 7, elapsed_s=30.0, budget_s=60.0) == pytest.approx(0.5)
    assert lr_factor(schedule, 7, elapsed_s=90.0, budget_s=60.0) == pytest.approx(0.0)
    # with both budgets the one further along wins
    assert lr_factor(schedule, 2, total_steps=4, elapsed_s=0.0, budget_s=60.0) == pytest.approx(0.5)
    assert lr_factor(schedule, 0, total_steps=4, elapsed_s=30.0, budget_s=60.0) == pytest.approx(0.5)
    assert lr_factor(schedule, 0, total_steps=1) == 1.0  # a one-step run still takes a full step
