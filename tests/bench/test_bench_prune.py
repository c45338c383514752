import statistics

import pytest

from trustseg.bench.prune import bench_prune
from trustseg.errors import UserError


def test_bench_prune_times_both_models_interleaved(one_thread):
    result = bench_prune(backbone="vit_ti16", depth=2, size=(32, 32), flops_ratio=0.6, warmup=1, runs=3)
    times = result["latency_ms"]
    assert len(times["unpruned"]) == len(times["pruned"]) == 3 and min(times["pruned"] + times["unpruned"]) > 0
    medians = {name: statistics.median(values) for name, values in times.items()}
    assert result["latency_ratio"] == pytest.approx(medians["pruned"] / medians["unpruned"])
    assert abs(result["flops_ratio"] - 0.6) <= 0.03
    assert result["gflops_per_image_pruned"] < result["gflops_per_image_unpruned"]
    assert result["params_m_pruned"] < result["params_m_unpruned"]


@pytest.mark.parametrize("kwargs,message", [({"runs": 0}, "runs"), ({"warmup": -1}, "warmup"),
                                            ({"size": (30, 32)}, "image_size"), ({"flops_ratio": 2}, "flops_ratio"),
                                            ({"backbone": "resnet50"}, "backbone")])
def test_bench_prune_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        bench_prune(**{"backbone": "vit_ti16", "depth": 1, "size": (32, 32), "runs": 1, **kwargs})
