"""The calibration benchmark on tiny sizes: its ECE check, its ratios, its memory counts, its report and
its CLI. Speeds are never asserted (shared machines)."""

import sys

import pytest
import torch
from cli_helpers import run_cli

import trustseg.bench.calibration as bench
from trustseg.errors import UserError
from trustseg.metrics import CalibrationHistogram

SMALL = dict(num_images=3, height=64, width=96, num_classes=5, repeats=2, pool_size=2, threads=1)


@pytest.fixture(scope="module")
def small_result():
    return bench.bench_calibration(**SMALL)


def test_every_stage_is_timed_and_the_eces_agree(small_result):
    r = small_result
    for name in bench.STAGES:
        assert 0 < r[name]["ms_per_image_best"] <= r[name]["ms_per_image_median"]
    ece = r["ECE"]
    for ours in ("ours", "ours_top_label"):
        for reference in ("torchmetrics_float64", "torchmetrics_logits_float64"):
            assert ece[ours] == pytest.approx(ece[reference], abs=1e-6)
    assert ece["ours"] == pytest.approx(ece["torchmetrics"], abs=1e-3)  # torchmetrics sums in float32
    assert 0 < ece["ours"] < 1
    assert r["machine"]["threads"] == 1 and len(r["machine"]["load_average_before"]) == 3


# Stage times (ms per image) put in place of the measured ones, with medians and bests chosen by hand
KNOWN_MS = {
    "eval_pass": [40.0, 20.0, 30.0],  # median 30, best 20
    "softmax": [3.0, 1.0, 2.0],  # 2, 1
    "ours": [6.0, 4.0, 5.0],  # 5, 4
    "ours_top_label": [2.0, 4.0, 3.0],  # 3, 2
    "torchmetrics_logits": [12.0, 9.0, 15.0],  # 12, 9
    "torchmetrics": [6.0, 3.0, 9.0],  # 6, 3
    "flatten": [1.0, 1.0, 1.0],
}


def test_ratios_from_known_stage_times(monkeypatch):
    """The timed run (with its ECE checks) goes ahead; its times are then replaced by KNOWN_MS."""
    real = bench._time_interleaved

    def known_times(stages, *args, **kwargs):
        measured = real(stages, *args, **kwargs)
        assert set(measured) == set(KNOWN_MS)
        return KNOWN_MS

    monkeypatch.setattr(bench, "_time_interleaved", known_times)
    r = bench.bench_calibration(**SMALL)
    assert (r["ours"]["ms_per_image_median"], r["ours"]["ms_per_image_best"]) == (5.0, 4.0)
    expected = {
        "speedup_top_label": (12 / 3, 9 / 2),
        "speedup_top_label_floor": (6 / 3, 3 / 2),
        "speedup_all_metrics": (12 / 5, 9 / 4),
        "speedup_all_metrics_floor": (6 / 5, 3 / 4),
        "overhead": (5 / 30, 4 / 20),
        "overhead_with_softmax": ((5 + 2) / 30, (4 + 1) / 20),
    }
    for ratio, (median, best) in expected.items():
        assert r[f"{ratio}_median"] == pytest.approx(median), ratio
        assert r[f"{ratio}_best"] == pytest.approx(best), ratio


def test_our_memory_is_constant_and_torchmetrics_grows(small_result):
    for name in ("ours", "ours_top_label"):
        ours = small_result[name]
        # our temporaries depend a little on the image (how many uncertain pixels), not on the stream
        assert 0 < ours["peak_extra_bytes_stream"] <= 1.05 * ours["peak_extra_bytes_one_batch"]
    for name in ("torchmetrics", "torchmetrics_logits"):
        tm = small_result[name]
        # torchmetrics keeps a float32 confidence and accuracy per labelled pixel (about 90% of 64x96)
        assert tm["peak_extra_bytes_stream"] - tm["peak_extra_bytes_one_batch"] > 0.8 * 64 * 96 * 8


def test_report_is_plain_and_fits_80_columns(small_result):
    text = bench.format_calibration_bench(small_result)
    assert "trustseg, top-label only" in text and f"{small_result['speedup_top_label_median']:.2f}x" in text
    assert "[" not in text  # printed through rich: no accidental markup
    assert max(map(len, text.splitlines())) <= 80


def test_a_disagreeing_ece_raises(monkeypatch):
    monkeypatch.setattr(bench, "_top_label_histogram", lambda k: CalibrationHistogram(k, num_bins=10, classwise=False))
    with pytest.raises(RuntimeError, match="ECE disagrees"):
        bench.bench_calibration(**SMALL)


def test_missing_torchmetrics_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.classification", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[test\]'"):
        bench.bench_calibration(**SMALL)


@pytest.mark.parametrize(
    "bad, match",
    [(dict(num_images=0), "num_images"), (dict(threads=0), "threads"), (dict(height=50), "64x96")],
)
def test_bad_arguments_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        bench.bench_calibration(**{**SMALL, **bad})


def test_logits_pool_is_a_confident_model_that_is_sometimes_wrong():
    logits, target = bench.make_logits_pool(2, 64, 96, 19, 0.1, seed=0)
    assert logits.shape == (2, 19, 64, 96) and target.shape == (2, 64, 96)
    labelled = target != bench.IGNORE_INDEX
    probs = logits.softmax(1)
    accuracy = (probs.argmax(1) == target)[labelled].float().mean()
    uncertain = (probs.amax(1) < 0.93).float().mean()
    assert 0.75 < accuracy < 0.9 and 0.15 < uncertain < 0.35
    assert 0.05 < 1 - labelled.float().mean() < 0.15


def test_cli_prints_the_report(monkeypatch, capsys):
    threads = torch.get_num_threads()
    args = ["--num-images", "1", "--size", "64,64", "--num-classes", "3", "--repeats", "1", "--threads", "1"]
    assert run_cli(["bench", "calibration", *args], monkeypatch) == 0
    assert torch.get_num_threads() == threads
    assert "calibration benchmark: 1 images 64x64, 3 classes" in capsys.readouterr().out
