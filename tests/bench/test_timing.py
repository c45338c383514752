import pytest

from trustseg.bench.timing import medians, time_rotating


def test_every_contender_is_timed_runs_times_in_rotating_order():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = time_rotating(contenders, runs=3, warmup=1)
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for values in times.values() for t in values)
    # four rounds, each starting one contender later: abc, bca, cab, abc
    assert "".join(calls) == "abcbcacababc"
    assert set(medians(times)) == {"a", "b", "c"}


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="runs"):
        time_rotating({"a": lambda: None}, runs=0)
