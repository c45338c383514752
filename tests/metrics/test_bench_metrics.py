"""The metrics benchmark: its equality check, its memory counter and its report."""

import sys

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

import trustseg.bench.metrics as bench
from trustseg.bench.memory import peak_tensor_bytes
from trustseg.errors import UserError

SMALL = dict(num_images=5, height=24, width=40, num_classes=5, repeats=2, pool_size=2)


def test_small_run_reports_both_and_agrees():
    result = bench.bench_metrics(**SMALL)
    assert result["mIoU"] == pytest.approx(result["mIoU_torchmetrics"], abs=1e-6)
    assert 0.0 < result["mIoU"] < 1.0
    for name in ("ours", "torchmetrics"):
        r = result[name]
        assert 0 < r["ms_per_image_best"] <= r["ms_per_image_median"]
        assert r["peak_extra_bytes_one_batch"] > 0
    # a streaming state: five images need no more memory than one
    assert result["ours"]["peak_extra_bytes_stream"] == result["ours"]["peak_extra_bytes_one_batch"]
    assert result["ours"]["state_bytes"] == 5 * 5 * 8
    text = bench.format_metrics_bench(result)
    assert "trustseg ConfusionMatrix" in text and f"{result['speedup_median']:.1f}x" in text
    assert "[" not in text  # printed through rich: no accidental markup
    assert max(map(len, text.splitlines())) <= 80  # a non-interactive console wraps at 80


def test_speedups_from_known_times(monkeypatch):
    """The timed run (with its mIoU check) goes ahead; its times are then replaced by hand-picked ones."""
    real = bench._time_interleaved

    def known_times(metrics, *args, **kwargs):
        assert set(real(metrics, *args, **kwargs)) == {"ours", "torchmetrics"}
        return {"ours": [2.0, 4.0, 3.0], "torchmetrics": [12.0, 9.0, 30.0]}

    monkeypatch.setattr(bench, "_time_interleaved", known_times)
    result = bench.bench_metrics(**SMALL)
    assert (result["ours"]["ms_per_image_median"], result["ours"]["ms_per_image_best"]) == (3.0, 2.0)
    assert (result["torchmetrics"]["ms_per_image_median"], result["torchmetrics"]["ms_per_image_best"]) == (12.0, 9.0)
    assert result["speedup_median"] == pytest.approx(4.0) and result["speedup_best"] == pytest.approx(4.5)
    assert "4.0x" in bench.format_metrics_bench(result)


def test_a_disagreeing_mIoU_raises(monkeypatch):
    monkeypatch.setattr(bench, "_jaccard_index", lambda k: MulticlassJaccardIndex(k, average="micro", ignore_index=255))
    with pytest.raises(RuntimeError, match="mIoU disagrees"):
        bench.bench_metrics(**SMALL)


def test_missing_torchmetrics_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics.classification", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[test\]'"):
        bench.bench_metrics(**SMALL)


@pytest.mark.parametrize(
    "bad", [dict(num_images=0), dict(batch_size=0), dict(ignore_fraction=1.0), dict(num_classes=300)]
)
def test_bad_arguments_are_user_errors(bad):
    with pytest.raises(UserError):
        bench.bench_metrics(**{**SMALL, **bad})


def test_batches_cycle_a_pool_and_cover_every_image():
    pred, target = bench.make_pool(3, 16, 16, 4, 0.25, seed=0)
    assert pred.shape == target.shape == (3, 16, 16)
    assert not torch.equal(target[0], target[1])
    ignored = (target == 255).float().mean().item()
    assert 0.15 < ignored < 0.35


def test_peak_tensor_bytes_counts_live_allocations():
    def work():
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.ones(500)  # 6000 alive
        del a
        c = torch.ones(250) * 2  # b + ones + product = 4000 alive
        b.add_(1)  # in place: nothing new
        return b[:10], c

    assert peak_tensor_bytes(work) == 6000
    kept = []
    assert peak_tensor_bytes(lambda: [kept.append(torch.zeros(100)) for _ in range(3)]) == 1200
