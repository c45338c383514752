"""Side-by-side timing of alternatives on a noisy machine.

Each round runs every contender once, the order rotating from round to round, so a neighbour's burst
of load hits all of them alike; the first ``warmup`` rounds are discarded (allocations, oneDNN
primitive creation). Ratios of medians from one such run are what a benchmark reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trustseg.engine.devices import synchronize


def time_rotating(contenders: Mapping[str, Callable[[], Any]], *, runs: int, warmup: int = 2,
                  device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """ms of each kept call of every contender (``runs`` each), GPU work synchronised around each call."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}
