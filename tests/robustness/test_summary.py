"""Robustness summaries against the formulas written out by hand (Hendrycks & Dietterich 2019)."""

import math

import numpy as np
import pytest

from trustseg.robustness.summary import CLEAN, condition_key, summarize

CORRUPTIONS = ("gaussian_noise", "fog", "pixelate")
SEVERITIES = (1, 2, 3)


def conditions_from(clean, grid):
    conditions = {CLEAN: {"mIoU": clean}}
    for name, row in zip(CORRUPTIONS, grid):
        for severity, miou in zip(SEVERITIES, row):
            conditions[condition_key(name, severity)] = {"mIoU": miou}
    return conditions


def test_mean_relative_robustness_and_worst():
    grid = np.array([[0.5, 0.4, 0.2], [0.7, 0.6, 0.55], [0.65, 0.6, 0.3]])
    summary = summarize(conditions_from(0.8, grid), CORRUPTIONS, SEVERITIES)
    assert summary["clean_mIoU"] == 0.8
    assert summary["mean_corrupted_mIoU"] == pytest.approx(grid.mean())
    assert summary["relative_robustness"] == pytest.approx(grid.mean() / 0.8)
    assert summary["per_corruption"]["fog"]["mIoU"] == pytest.approx(grid[1].mean())
    assert summary["per_family_mIoU"] == pytest.approx({"noise": grid[0].mean(), "weather": grid[1].mean(),
                                                        "digital": grid[2].mean()})
    assert summary["worst"] == ["gaussian_noise", "pixelate", "fog"]
    assert "mCE" not in summary


def test_corruption_errors_against_a_baseline():
    ours, base = np.array([[0.5, 0.4, 0.2], [0.7, 0.6, 0.55], [0.65, 0.6, 0.3]]), np.array(
        [[0.4, 0.3, 0.1], [0.72, 0.5, 0.4], [0.6, 0.5, 0.2]])
    summary = summarize(conditions_from(0.8, ours), CORRUPTIONS, SEVERITIES, conditions_from(0.75, base))
    ce = (1 - ours).sum(1) / (1 - base).sum(1)
    rce = (0.8 - ours).sum(1) / (0.75 - base).sum(1)
    for i, name in enumerate(CORRUPTIONS):
        assert summary["per_corruption"][name]["CE"] == pytest.approx(ce[i])
        assert summary["per_corruption"][name]["rCE"] == pytest.approx(rce[i])
    assert summary["mCE"] == pytest.approx(ce.mean())
    assert summary["relative_mCE"] == pytest.approx(rce.mean())


def test_self_baseline_gives_unit_errors_and_undefined_relative_error_is_nan():
    grid = np.array([[0.5, 0.4, 0.2], [0.8, 0.8, 0.8], [0.65, 0.6, 0.3]])
    conditions = conditions_from(0.8, grid)
    summary = summarize(conditions, CORRUPTIONS, SEVERITIES, conditions)
    assert all(e["CE"] == pytest.approx(1.0) for e in summary["per_corruption"].values())
    # fog does not degrade the baseline at all: rCE has a zero denominator
    assert math.isnan(summary["per_corruption"]["fog"]["rCE"])
    assert summary["relative_mCE"] == pytest.approx(1.0)
