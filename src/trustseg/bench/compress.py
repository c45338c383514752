"""Token merging speed check: a ViT segmenter with and without ToMe, timed side by side.

Each round times one plain forward and one ToMe forward, the order alternating from round to round,
so a neighbour's burst of load on a shared machine hits both; the first ``warmup`` rounds are
discarded and medians are reported. In the ToMe forward the time spent inside the reducers
(matching + merging, unmerging excluded) is clocked separately and reported as a share of the
time spent in the blocks. r is the same in every block, chosen so that ``removed_fraction`` of
the patch tokens are merged away by the last block.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from trustseg.bench.machine import cpu_name
from trustseg.compress.reducers import find_vit, reduced_token_counts, remove_token_reducers
from trustseg.compress.tome import install_tome
from trustseg.engine.devices import describe_device, resolve_device, synchronize
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.models.vit import TokenContext, Unmerge


def bench_token_merging(
    backbone: str = "vit_s16",
    *,
    size: int = 512,
    batch_size: int = 1,
    removed_fraction: float = 0.5,
    depth: int | None = None,
    warmup: int = 2,
    runs: int = 10,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median forward time of a linear-head segmenter, plain vs ToMe, at ``size`` x ``size``.

    Args:
        backbone: a ViT preset name (``vit_ti16``, ``vit_s16``, ...); weights are random.
        removed_fraction: share of the patch tokens merged away by the last block, in (0, 1).
        depth: backbone blocks, if not the preset's (small models for tests).
        threads: intra-op threads for the run (restored afterwards); None keeps torch's setting.

    Returns a dict with ``config``, ``machine``, ``r``, token and FLOP counts, the raw per-round
    times, ``speedup`` (median plain / median ToMe), ``speedup_per_round_median`` (median of each
    round's plain / ToMe) and ``merge_overhead_fraction`` (median over rounds of reducer time / block
    time in the ToMe forward).
    """
    bounds = (("size", size, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0), ("runs", runs, 1))
    for name, value, least in bounds:
        if value < least:
            raise UserError(f"bench token merging: {name} must be >= {least}, got {value}")
    if not 0.0 < removed_fraction < 1.0:
        raise UserError(f"bench token merging: removed_fraction must be in (0, 1), got {removed_fraction}")
    target = resolve_device(device)
    options: dict[str, Any] = {"backbone": backbone, "head": "linear"}
    if depth is not None:
        options["depth"] = depth
    net = build_model("vit_segmenter", num_classes=19, **options).eval()
    vit = find_vit(net)
    patch = vit.config.patch_size
    if size % patch:
        raise UserError(f"bench token merging: size {size} is not a multiple of the patch size {patch}")
    patches = (size // patch) ** 2
    r = max(1, round(removed_fraction * patches / vit.config.depth))

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
        plain_flops = count_flops(net, tuple(x.shape))
        install_tome(net, r=r, image_size=(size, size))
        tome_flops = count_flops(net, tuple(x.shape))
        tokens = reduced_token_counts(net, x)
        net, x = net.to(target), x.to(target)
        load_before = os.getloadavg()
        times = _time_side_by_side(net, x, warmup, runs)
        load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved_threads)
        remove_token_reducers(net)

    prefix = vit.num_prefix_tokens
    full = prefix + patches
    plain_ms, tome_ms = statistics.median(times["plain_ms"]), statistics.median(times["tome_ms"])
    overhead = [m / b for m, b in zip(times["merge_ms"], times["blocks_ms"])]
    return {
        "config": {
            "backbone": backbone,
            "depth": vit.config.depth,
            "size": size,
            "batch_size": batch_size,
            "removed_fraction": removed_fraction,
            "warmup": warmup,
            "runs": runs,
            "seed": seed,
        },
        "machine": {
            "cpu": cpu_name(),
            "device": describe_device(target),
            "torch": torch.__version__,
            "threads": used_threads,
            "date": datetime.date.today().isoformat(),
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
        },
        "r": r,
        "tokens_full": full,
        "tokens_after_last_block": tokens[-1].mlp,
        "mean_token_fraction": sum(t.attention + t.mlp for t in tokens) / (2 * len(tokens) * full),
        "gflops_plain": plain_flops / batch_size / 1e9,
        "gflops_tome": tome_flops / batch_size / 1e9,
        **{key: list(value) for key, value in times.items()},
        "plain_ms_median": plain_ms,
        "tome_ms_median": tome_ms,
        "speedup": plain_ms / tome_ms,
        # robust to load that changes between rounds: each round's pair shares the same conditions
        "speedup_per_round_median": statistics.median(p / t for p, t in zip(times["plain_ms"], times["tome_ms"])),
        "merge_overhead_fraction": statistics.median(overhead),
    }


def _time_side_by_side(net: nn.Module, x: Tensor, warmup: int, runs: int) -> dict[str, list[float]]:
    """Per kept round: ms of a plain and a ToMe forward, and within the ToMe forward the ms spent in
    the blocks and inside the reducers."""
    vit = find_vit(net)
    reducers = {i: block.token_reducer for i, block in enumerate(vit.blocks) if block.token_reducer is not None}
    clock = {"merge": 0.0, "blocks_start": 0.0, "blocks": 0.0}  # seconds

    def timed(reducer: Any) -> Any:
        def run(tokens: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
            synchronize(tokens.device)
            start = time.perf_counter()
            out = reducer(tokens, keys, ctx)
            synchronize(tokens.device)
            clock["merge"] += time.perf_counter() - start
            return out

        return run

    def blocks_start(*_: Any) -> None:
        synchronize(x.device)
        clock["blocks_start"] = time.perf_counter()

    def blocks_end(*_: Any) -> None:
        synchronize(x.device)
        clock["blocks"] = time.perf_counter() - clock["blocks_start"]

    def forward(with_tome: bool) -> tuple[float, float, float]:
        """(total, blocks, reducers) ms of one forward."""
        for i, reducer in reducers.items():
            vit.blocks[i].token_reducer = timed(reducer) if with_tome else None
        clock["merge"] = 0.0
        synchronize(x.device)
        start = time.perf_counter()
        with torch.inference_mode():
            net(x)
        synchronize(x.device)
        return (time.perf_counter() - start) * 1e3, clock["blocks"] * 1e3, clock["merge"] * 1e3

    out: dict[str, list[float]] = {"plain_ms": [], "tome_ms": [], "blocks_ms": [], "merge_ms": []}
    handles = [vit.blocks[0].register_forward_pre_hook(blocks_start), vit.blocks[-1].register_forward_hook(blocks_end)]
    try:
        for round_ in range(warmup + runs):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            measured = {with_tome: forward(with_tome) for with_tome in order}
            if round_ >= warmup:
                out["plain_ms"].append(measured[False][0])
                out["tome_ms"].append(measured[True][0])
                out["blocks_ms"].append(measured[True][1])
                out["merge_ms"].append(measured[True][2])
    finally:
        for handle in handles:
            handle.remove()
        for i, reducer in reducers.items():
            vit.blocks[i].token_reducer = reducer
    return out
