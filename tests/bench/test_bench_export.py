"""`bench_export` on a small U-Net: the reported numbers follow from the raw timings, both runtimes compute
the same logits, and bad arguments are user errors. Speeds are never asserted (shared machines)."""

import statistics

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from trustseg.bench.export import bench_export, format_export_bench  # noqa: E402
from trustseg.errors import UserError  # noqa: E402

from cli_helpers import run_cli  # noqa: E402


@pytest.mark.slow
def test_reported_numbers_follow_from_the_interleaved_timings(one_thread):
    result = bench_export("unet", size=(32, 48), batch_size=2, runs=3, warmup=1, threads=1)
    times = {name: r["ms"] for name, r in result["results"].items()}
    assert sorted(times) == ["onnxruntime", "torch"] and all(len(ms) == 3 for ms in times.values())
    for name, r in result["results"].items():
        assert r["ms_median"] == statistics.median(r["ms"]) and r["ms_best"] == min(r["ms"])
    assert result["speedup_median"] == pytest.approx(statistics.median(times["torch"]) /
                                                     statistics.median(times["onnxruntime"]))
    assert result["machine"]["threads"] == 1 and result["exporter"] == "dynamo"
    assert result["parity"]["ok"] and result["parity"]["shape"] == [2, 19, 32, 48]
    text = format_export_bench(result)
    assert "onnxruntime speed-up" in text and "1 threads each" in text
    assert torch.get_num_threads() == 1  # restored


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "resnet"}, "unknown model 'resnet'"),
    ({"model": "unet", "size": (30, 32)}, "divisible by 16"),
    ({"model": "unet", "runs": 0}, "runs must be >= 1"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        bench_export(**kwargs)


def test_the_cli_verb_reports_a_bad_model_in_one_line(monkeypatch, capsys):
    assert run_cli(["bench", "export", "--model", "resnet"], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'resnet'" in err and "\n" not in err
