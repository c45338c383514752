"""`trustseg bench compress`: a ViT segmenter compressed several ways, each timed against the plain
model in the same run.

Every variant is built from one randomly initialised segmenter (pruning by magnitude, which needs no
data; token reduction installed on top) and all are timed in rotating order (`bench.timing`), so a
neighbour's burst of load hits them alike; speed-ups are ratios of medians from that one run. For
variants that reduce tokens, the time spent inside the reducers (matching and merging; unmerging is
cheap copying and not clocked) is measured in separate forwards and reported as a share of the time
spent in the blocks: the merging overhead.
"""

from __future__ import annotations

import copy
import datetime
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trustseg.bench.machine import cpu_name
from trustseg.bench.timing import time_rotating
from trustseg.compress.apply import install_token_reduction, tome_r
from trustseg.compress.policy import PolicyNet
from trustseg.compress.prune import prune_model
from trustseg.compress.reducers import find_vit, reduced_token_counts
from trustseg.compress.spec import parse_spec
from trustseg.engine.devices import describe_device, resolve_device, synchronize
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.models.vit import TokenContext, Unmerge

PLAIN = "uncompressed"


def default_methods(backbone: str, size: int, depth: int | None = None) -> list[str]:
    """Half of the patch tokens merged away by the last block (ToMe) or removed at the input (CTS: 2/3
    of the 2x2 windows shared), pruning to half of the FLOPs, and pruning plus merging, both milder."""
    with torch.device("meta"):  # only the shape of the model is needed
        vit = find_vit(build_model("vit_segmenter", num_classes=2, backbone=backbone,
                                   **({} if depth is None else {"depth": depth})))
    r = tome_r(0.5, (size // vit.config.patch_size) ** 2, vit.config.depth)
    windows = (size // vit.config.patch_size // 2) ** 2
    return [f"tome:r={r}", f"cts:k={windows * 2 // 3}", "prune:flops=0.5,importance=magnitude",
            f"prune:flops=0.7,importance=magnitude+tome:r={r // 2}"]


def build_variant(net: nn.Module, spec: str, size: tuple[int, int], seed: int = 0) -> nn.Module:
    """A copy of `net` compressed by `spec`. The bench has no data: pruning must use magnitude importance,
    and CTS runs an untrained policy (it costs the same; only which windows are shared differs)."""
    model = copy.deepcopy(net)
    for step in parse_spec(spec):
        if step.method == "prune":
            if step.options.get("importance", "taylor") != "magnitude":
                raise UserError(f"bench compress: {spec!r} prunes with Taylor importance, which needs data; "
                                "add importance=magnitude")
            model, _ = prune_model(model, step.options["flops"], importance="magnitude", image_size=size)
        elif step.method == "cts":
            torch.manual_seed(seed)
            install_token_reduction(model, step, size, policy_state=PolicyNet().state_dict())
        else:
            install_token_reduction(model, step, size)
    return model.eval()


def bench_compression(
    backbone: str = "vit_s16",
    *,
    methods: Sequence[str] | None = None,
    size: int = 512,
    batch_size: int = 1,
    depth: int | None = None,
    warmup: int = 2,
    runs: int = 10,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median forward ms of a linear-head segmenter and of each compressed variant, at ``size`` x ``size``.

    Args:
        backbone: a ViT preset (``vit_ti16``, ``vit_s16``, ...) with random weights; `depth` overrides its
            block count (small models for tests).
        methods: compression specs (``tome:r=43``, ``prune:flops=0.5,importance=magnitude``, chains);
            None: ``default_methods``.
        threads: intra-op threads for the run (restored afterwards); None keeps torch's setting.

    Returns ``config``, ``machine`` and per variant (the plain model first): GFLOPs, FLOP ratio,
    params, mean token fraction over the blocks, raw and median ms, ``speedup`` (median plain /
    median variant) and, for token reduction, ``merge_overhead`` (median reducer share of block time).
    """
    for name, value, least in (("size", size, 1), ("batch_size", batch_size, 1), ("warmup", warmup, 0), ("runs", runs, 1)):
        if value < least:
            raise UserError(f"bench compress: {name} must be >= {least}, got {value}")
    target = resolve_device(device)
    options: dict[str, Any] = {"backbone": backbone, "head": "linear", **({} if depth is None else {"depth": depth})}
    torch.manual_seed(seed)
    net = build_model("vit_segmenter", num_classes=19, **options).eval()
    patch = find_vit(net).config.patch_size
    if size % patch:
        raise UserError(f"bench compress: size {size} is not a multiple of the patch size {patch}")
    methods = list(methods) if methods is not None else default_methods(backbone, size, depth)
    variants = {PLAIN: net, **{spec: build_variant(net, spec, (size, size), seed) for spec in methods}}

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
        flops = {name: count_flops(model, tuple(x.shape)) for name, model in variants.items()}
        tokens = {name: _mean_token_fraction(model, x) for name, model in variants.items()}
        variants = {name: model.to(target) for name, model in variants.items()}
        x = x.to(target)
        load_before = os.getloadavg()
        times = time_rotating({name: _forward(model, x) for name, model in variants.items()}, runs=runs,
                              warmup=warmup, device=target)
        overhead = {name: _merge_overhead(model, x, runs) for name, model in variants.items() if _reduces_tokens(model)}
        load_after = os.getloadavg()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(saved_threads)

    plain_ms = statistics.median(times[PLAIN])
    results = {}
    for name, model in variants.items():
        median = statistics.median(times[name])
        results[name] = {
            "gflops": flops[name] / batch_size / 1e9, "flops_ratio": flops[name] / flops[PLAIN],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "mean_token_fraction": tokens[name],
            "ms": times[name], "ms_median": median, "speedup": plain_ms / median,
            **({"merge_overhead": overhead[name]} if name in overhead else {}),
        }
    return {
        "config": {"backbone": backbone, "depth": find_vit(net).config.depth, "size": size, "batch_size": batch_size,
                   "methods": methods, "warmup": warmup, "runs": runs, "seed": seed},
        "machine": {"cpu": cpu_name(), "device": describe_device(target), "torch": torch.__version__,
                    "threads": used_threads, "date": datetime.date.today().isoformat(),
                    "load_average_before": list(load_before), "load_average_after": list(load_after)},
        "results": results,
    }


def format_compression_bench(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "GFLOPs", "FLOPs", "params (M)", "tokens", "ms (median)", "speed-up", "merge overhead"]
    rows = []
    for name, r in result["results"].items():
        overhead = f"{100 * r['merge_overhead']:.1f}%" if "merge_overhead" in r else "-"
        rows.append([name, f"{r['gflops']:.2f}", f"{100 * r['flops_ratio']:.1f}%", f"{r['params_m']:.2f}",
                     f"{100 * r['mean_token_fraction']:.1f}%", f"{r['ms_median']:.1f}", f"{r['speedup']:.2f}x", overhead])
    return header, rows


def _forward(model: nn.Module, x: Tensor):
    def run() -> Any:
        with torch.inference_mode():
            return model(x)
    return run


def _mean_token_fraction(model: nn.Module, x: Tensor) -> float:
    """Mean over blocks (attention and MLP) of the tokens processed, as a fraction of the full count."""
    vit = find_vit(model)
    counts = reduced_token_counts(model, x)
    full = vit.num_prefix_tokens + (x.shape[-2] // vit.config.patch_size) * (x.shape[-1] // vit.config.patch_size)
    return sum(c.attention + c.mlp for c in counts) / (2 * len(counts) * full)


def _reducers(model: nn.Module) -> dict[int, Any]:
    return {i: b.token_reducer for i, b in enumerate(find_vit(model).blocks) if b.token_reducer is not None}


def _reduces_tokens(model: nn.Module) -> bool:
    return bool(_reducers(model)) or find_vit(model).input_reducer is not None


def _merge_overhead(model: nn.Module, x: Tensor, runs: int) -> float:
    """Median over `runs` forwards of (time inside the reducers) / (time in the blocks). An input reducer
    (CTS: its policy and window embedding) is clocked from the end of the patch embedding to the first
    block, which also holds the position embedding's addition, a negligible share."""
    vit = find_vit(model)
    reducers = _reducers(model)
    clock = {"merge": 0.0, "start": 0.0, "blocks": 0.0, "embedded": 0.0}

    def timed(reducer: Any) -> Any:
        def run(tokens: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
            synchronize(tokens.device)
            start = time.perf_counter()
            out = reducer(tokens, keys, ctx)
            synchronize(tokens.device)
            clock["merge"] += time.perf_counter() - start
            return out
        return run

    def embedded(*_: Any) -> None:
        synchronize(x.device)
        clock["embedded"] = time.perf_counter()

    def blocks_start(*_: Any) -> None:
        synchronize(x.device)
        clock["start"] = time.perf_counter()
        if vit.input_reducer is not None:
            clock["merge"] += clock["start"] - clock["embedded"]

    def blocks_end(*_: Any) -> None:
        synchronize(x.device)
        clock["blocks"] = time.perf_counter() - clock["start"]

    handles = [vit.patch_embed.register_forward_hook(embedded), vit.blocks[0].register_forward_pre_hook(blocks_start),
               vit.blocks[-1].register_forward_hook(blocks_end)]
    for i, reducer in reducers.items():
        vit.blocks[i].token_reducer = timed(reducer)
    shares = []
    try:
        with torch.inference_mode():
            for _ in range(runs):
                clock["merge"] = 0.0
                model(x)
                shares.append(clock["merge"] / clock["blocks"])
    finally:
        for handle in handles:
            handle.remove()
        for i, reducer in reducers.items():
            vit.blocks[i].token_reducer = reducer
    return statistics.median(shares)
