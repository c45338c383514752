"""`bench compress` on a tiny ViT: the bookkeeping, not the speed."""

import pytest

from trustseg.bench.compress import PLAIN, bench_compression, default_methods, format_compression_bench
from trustseg.errors import UserError


def test_every_variant_is_timed_against_the_plain_model_in_one_run(one_thread):
    methods = ["tome:r=4", "prune:flops=0.6,importance=magnitude", "prune:flops=0.7,importance=magnitude+tome:r=2",
               "cts:k=2"]
    result = bench_compression("vit_ti16", methods=methods, size=64, depth=2, warmup=1, runs=3)
    results = result["results"]
    assert list(results) == [PLAIN, *methods]
    plain = results[PLAIN]
    assert plain["flops_ratio"] == 1 and plain["mean_token_fraction"] == 1 and plain["speedup"] == 1
    assert "merge_overhead" not in plain and "merge_overhead" not in results[methods[1]]
    # 4 x 4 patches + CLS; r = 4 per block over 2 blocks: 17 -> 13 tokens in block 0's MLP, 13 -> 9 in block 1
    assert results["tome:r=4"]["mean_token_fraction"] == pytest.approx((17 + 13 + 13 + 9) / (4 * 17))
    assert results["tome:r=4"]["params_m"] == plain["params_m"]
    assert abs(results[methods[1]]["flops_ratio"] - 0.6) < 0.03 and results[methods[1]]["params_m"] < plain["params_m"]
    for name, entry in results.items():
        assert len(entry["ms"]) == 3 and entry["ms_median"] == sorted(entry["ms"])[1]
        assert entry["speedup"] == pytest.approx(plain["ms_median"] / entry["ms_median"])
    for name in (methods[0], methods[2]):
        assert 0 < results[name]["merge_overhead"] < 1 and results[name]["flops_ratio"] < 1
    # CTS's policy network outweighs a 2-block ViT of 17 tokens: its overhead is counted, not bounded here
    assert results["cts:k=2"]["merge_overhead"] > 0
    # two of the four 2x2 windows shared: 17 -> 11 tokens in every block
    assert results["cts:k=2"]["mean_token_fraction"] == pytest.approx(11 / 17)
    header, rows = format_compression_bench(result)
    assert [row[0] for row in rows] == [PLAIN, *methods] and len(header) == len(rows[0])


def test_default_methods_halve_tokens_and_flops():
    # 32 x 32 patches over 12 blocks: r = 43 merges 516 of 1024 away; k = 170 of 256 windows removes 510
    assert default_methods("vit_s16", 512) == [
        "tome:r=43", "cts:k=170", "prune:flops=0.5,importance=magnitude",
        "prune:flops=0.7,importance=magnitude+tome:r=21"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=60), "size 60 is not a multiple of the patch size 16"),
    (dict(runs=0), "runs must be >= 1"),
    (dict(methods=["prune:flops=0.5"]), "needs data; add importance=magnitude"),
    (dict(methods=["tome:r=100"]), "larger than the 4 patch tokens"),
])
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        bench_compression("vit_ti16", depth=1, **{"size": 32, **kwargs})
