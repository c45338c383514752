"""The token-merging speed check on a tiny ViT: the bookkeeping, not the speed."""

import pytest

from trustseg.bench.compress import bench_token_merging
from trustseg.errors import UserError


def test_tiny_run_reports_consistent_numbers(one_thread):
    result = bench_token_merging("vit_ti16", size=64, depth=2, warmup=1, runs=3)
    # 4 x 4 patches, half of them merged away over 2 blocks: r = 4 per block
    assert result["r"] == 4 and result["tokens_full"] == 17 and result["tokens_after_last_block"] == 9
    assert result["mean_token_fraction"] == pytest.approx((17 + 13 + 13 + 9) / (4 * 17))
    assert 0 < result["gflops_tome"] < result["gflops_plain"]
    for key in ("plain_ms", "tome_ms", "blocks_ms", "merge_ms"):
        assert len(result[key]) == 3 and all(t > 0 for t in result[key])
    assert all(m < b < t for m, b, t in zip(result["merge_ms"], result["blocks_ms"], result["tome_ms"]))
    assert result["speedup"] == pytest.approx(
        sorted(result["plain_ms"])[1] / sorted(result["tome_ms"])[1]
    )
    ratios = sorted(p / t for p, t in zip(result["plain_ms"], result["tome_ms"]))
    assert result["speedup_per_round_median"] == pytest.approx(ratios[1])
    assert 0 < result["merge_overhead_fraction"] < 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(removed_fraction=1.0), "removed_fraction must be in \\(0, 1\\)"),
        (dict(size=60), "size 60 is not a multiple of the patch size 16"),
        (dict(runs=0), "runs must be >= 1"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        bench_token_merging("vit_ti16", depth=1, **{"size": 32, **kwargs})
