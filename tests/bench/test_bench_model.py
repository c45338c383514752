"""`bench_model` on a tiny config: the reported numbers must follow from the raw timings, the FLOP
count and the parameter count must match hand formulas, and bad arguments must be user errors.
Speeds are never asserted (shared machines)."""

import csv
import math
import statistics

import pytest
import torch

from trustseg.bench.model import (
    CSV_COLUMNS,
    MODELS,
    bench_model,
    build_bench_model,
    format_model_bench,
    summarize,
    write_csv_rows,
)
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops

B, H, W, K = 2, 64, 48, 19
RUNS, WARMUP, MM, MM_REPS = 2, 1, 96, 2
# vit_ti16 + linear head
C, DEPTH, PATCH, POS_GRID = 192, 12, 16, 14


def vit_ti16_hand_flops_per_image() -> int:
    n = (H // PATCH) * (W // PATCH)  # patch tokens
    t = n + 1  # + CLS
    patch_embed = 2 * n * C * 3 * PATCH * PATCH
    linear = DEPTH * 2 * t * (4 * C * C + 8 * C * C)  # qkv + proj + fc1 + fc2
    attention = DEPTH * 4 * t * t * C  # q k^T and attn @ v
    head = 2 * n * C * K
    return patch_embed + linear + attention + head


def vit_ti16_hand_params() -> int:
    block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    backbone = (3 * PATCH * PATCH * C + C) + C + POS_GRID**2 * C + DEPTH * block + 2 * C
    return backbone + C * K + K


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    csv_path = tmp_path_factory.mktemp("bench") / "benchmark-infer.csv"
    threads_before = torch.get_num_threads()
    result = bench_model(
        "vit_ti16",
        size=(H, W),
        batch_size=B,
        num_classes=K,
        warmup=WARMUP,
        runs=RUNS,
        threads=1,
        mm_size=MM,
        mm_reps=MM_REPS,
        csv_path=csv_path,
    )
    return result, csv_path, threads_before


def test_flops_and_params_match_independent_counts(tiny_result):
    result, _, _ = tiny_result
    model = build_model("vit_segmenter", num_classes=K, backbone="vit_ti16", head="linear").eval()
    assert result["gflops_per_image"] * 1e9 == pytest.approx(count_flops(model, (B, 3, H, W)) / B, rel=1e-12)
    assert result["gflops_per_image"] * 1e9 == pytest.approx(vit_ti16_hand_flops_per_image(), rel=1e-12)
    assert result["params_m"] * 1e6 == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-12)
    assert result["params_m"] * 1e6 == pytest.approx(vit_ti16_hand_params(), rel=1e-12)


def test_summarize_against_hand_computed_figures():
    r = summarize([500.0, 250.0, 400.0], [100.0, 50.0, 200.0, 80.0], batch_size=2, gflops_per_image=10.0, mm_gflop=18.0)
    # forwards: median 400 ms, best 250 ms for 2 images -> 5 and 8 img/s -> 50 and 80 GFLOP/s;
    # matmuls: median 90 ms, best 50 ms for 18 GFLOP -> 200 and 360 GFLOP/s
    assert (r["step_ms_median"], r["step_ms_best"]) == (400.0, 250.0)
    assert (r["img_per_s_median"], r["img_per_s_best"]) == pytest.approx((5.0, 8.0))
    assert (r["achieved_gflops_median"], r["achieved_gflops_best"]) == pytest.approx((50.0, 80.0))
    assert (r["peak_gflops_median"], r["peak_gflops_best"]) == pytest.approx((200.0, 360.0))
    assert (r["peak_fraction_median"], r["peak_fraction_best"]) == pytest.approx((0.25, 2 / 9))


def test_summaries_follow_from_raw_timings(tiny_result):
    """Every summary from the raw times, the hand FLOP count and the matmul size alone."""
    result, _, _ = tiny_result
    gflops = vit_ti16_hand_flops_per_image() / 1e9
    mm_gflop = 2 * MM**3 / 1e9
    assert list(result["results"]) == ["fp32", "bf16"]
    for r in result["results"].values():
        assert len(r["step_ms"]) == RUNS and len(r["mm_ms"]) == RUNS * MM_REPS  # warm-up discarded
        assert all(t > 0 for t in r["step_ms"] + r["mm_ms"])
        for stat, pick in (("median", statistics.median), ("best", min)):
            img_per_s = B * 1e3 / pick(r["step_ms"])
            peak = mm_gflop * 1e3 / pick(r["mm_ms"])
            assert r[f"img_per_s_{stat}"] == pytest.approx(img_per_s)
            assert r[f"achieved_gflops_{stat}"] == pytest.approx(gflops * img_per_s)
            assert r[f"peak_gflops_{stat}"] == pytest.approx(peak)
            assert r[f"peak_fraction_{stat}"] == pytest.approx(gflops * img_per_s / peak)


def test_machine_and_threads(tiny_result):
    result, _, threads_before = tiny_result
    m = result["machine"]
    assert m["threads"] == 1 and torch.get_num_threads() == threads_before  # set for the run, then restored
    assert m["torch"] == torch.__version__
    assert len(m["load_average_before"]) == 3


def test_csv_rows_match_result(tiny_result):
    result, csv_path, _ = tiny_result
    with csv_path.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [row["dtype"] for row in rows] == ["fp32", "bf16"]
    for row in rows:
        r = result["results"][row["dtype"]]
        assert row["model"] == "vit_ti16" and row["infer_img_size"] == f"{H}x{W}"
        assert int(row["infer_batch_size"]) == B
        assert math.isclose(float(row["infer_samples_per_sec"]), r["img_per_s_median"], rel_tol=1e-3, abs_tol=1e-3)
        assert math.isclose(float(row["infer_step_time"]), r["step_ms_median"], rel_tol=1e-3, abs_tol=0.01)
        assert math.isclose(float(row["param_count"]), result["params_m"], abs_tol=0.005)
        assert math.isclose(float(row["infer_gflops"]), result["gflops_per_image"], abs_tol=5e-4)
        assert math.isclose(float(row["peak_fraction"]), r["peak_fraction_median"], abs_tol=5e-5)


def test_format_shows_each_dtype(tiny_result):
    result, _, _ = tiny_result
    text = format_model_bench(result)
    for dtype, r in result["results"].items():
        line = next(line for line in text.splitlines() if line.startswith(dtype))
        assert f"{r['img_per_s_median']:.2f}" in line and f"{r['peak_fraction_median']:.1%}" in line


def test_csv_appends_rows_without_a_second_header(tiny_result, tmp_path):
    result, _, _ = tiny_result
    path = tmp_path / "rows.csv"
    for _ in range(2):
        write_csv_rows(result, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 2 * len(result["results"]) and lines.count(",".join(CSV_COLUMNS)) == 1


def test_every_short_name_builds():
    with torch.device("meta"):  # no weight initialisation cost
        for name in MODELS:
            model = build_bench_model(name)
            assert not model.training and model.size_divisor >= 1


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match="vit_s16") as info:
        bench_model("vit_xl99", size=32)
    assert "vit_xl99" in str(info.value) and "segformer_b0" in str(info.value) and "unet" in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=(50, 64)), "64x64"),  # names the padded size
        (dict(dtypes=("fp16",)), "fp16"),
        (dict(dtypes=()), "dtypes"),
        (dict(runs=0), "runs"),
        (dict(threads=0), "threads"),
        (dict(size=(32, 32, 3)), "size"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        bench_model("vit_ti16", **{"size": 32, **kwargs})
