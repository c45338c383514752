"""ALGM: window similarity against loops, hand-made tokens whose merging windows are known, the
adaptive global count against a hand computation, and the installed model end to end."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trustseg.compress.algm import LocalMergeReducer, install_algm
from trustseg.compress.merging import (
    adaptive_bipartite_matching,
    bipartite_soft_matching,
    window_matching,
    window_similarity,
)
from trustseg.compress.reducers import find_vit, reduced_token_counts
from trustseg.compress.tome import ToMeReducer
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.flops import count_flops
from trustseg.models.vit import TokenContext, ViT, ViTConfig, rope_tables

D = 6
E = torch.eye(D)
NEAR = F.normalize(E[2] + 0.5 * E[3], dim=0)  # cos(e2, NEAR) = 1 / sqrt(1.25)
NEAR_SIM = (6 + 6 / 1.25**0.5) / 12  # window (e2, e2, e2, NEAR): 6 ordered pairs at 1, 6 at 0.894


def grid_from_windows(windows):
    """4 windows (each 4 tokens: top-left, top-right, bottom-left, bottom-right) -> a 4x4 grid, row-major (16, D)."""
    grid = torch.zeros(4, 4, D)
    for k, tokens in enumerate(windows):
        i, j = divmod(k, 2)
        for t, (di, dj) in enumerate(itertools.product(range(2), range(2))):
            grid[2 * i + di, 2 * j + dj] = tokens[t]
    return grid.reshape(16, D)


CONSTANT = lambda v: [v] * 4  # noqa: E731  similarity 1
HALVES = [E[0], E[0], E[1], E[1]]  # similarity 2 / 12 * 2 = 1/3
SPREAD = [E[0], E[1], E[2], E[3]]  # similarity 0
NEAR_CONSTANT = [E[2], E[2], E[2], NEAR]


def hand_made_batch(prefix=2):
    sample0 = grid_from_windows([CONSTANT(E[0]), HALVES, SPREAD, NEAR_CONSTANT])
    sample1 = grid_from_windows([SPREAD, CONSTANT(E[1]), SPREAD, HALVES])
    patches = torch.stack([sample0, sample1])
    return torch.cat([torch.randn(2, prefix, D), patches], dim=1)


def test_window_similarity_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    h, w, p = 5, 4, 2  # an odd number of rows: the last row is in no window
    metric = torch.randn(3, p + h * w, 7, generator=g, dtype=torch.float64)
    sim = window_similarity(metric, (h, w), p)
    assert sim.shape == (3, 2, 2)
    for b, i, j in itertools.product(range(3), range(2), range(2)):
        tokens = [metric[b, p + (2 * i + di) * w + 2 * j + dj] for di in range(2) for dj in range(2)]
        pairs = [F.cosine_similarity(tokens[s], tokens[t], dim=0) for s in range(4) for t in range(4) if s != t]
        torch.testing.assert_close(sim[b, i, j], torch.stack(pairs).mean())


def test_hand_made_window_similarities():
    sim = window_similarity(hand_made_batch(), (4, 4), 2).flatten(1)
    want = torch.tensor([[1.0, 1 / 3, 0.0, NEAR_SIM], [0.0, 1.0, 0.0, 1 / 3]])
    torch.testing.assert_close(sim, want)


def window_tokens(k, w=4, p=2):
    i, j = divmod(k, w // 2)
    return [p + (2 * i + di) * w + 2 * j + dj for di in range(2) for dj in range(2)]


@pytest.mark.parametrize(
    "tau, merged",
    [
        (0.9, [[0], [1]]),  # sample 0 has 2 candidates, sample 1 has 1: both merge 1, the most similar
        (0.3, [[0, 3], [1, 3]]),  # 3 and 2 candidates: both merge 2
        (0.95, [[0], [1]]),  # NEAR_SIM = 0.947 < 0.95
        (0.999, [[0], [1]]),
        (-1.0, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ],
)
def test_local_merge_threshold_and_equal_count_across_batch(tau, merged):
    x = hand_made_batch()
    merge = window_matching(x, (4, 4), 2, tau)
    assert merge.num_out == 18 - 3 * len(merged[0])
    for b, windows in enumerate(merged):
        slots = merge.index[b]
        assert torch.equal(slots[:2], torch.arange(2))  # prefix
        grouped = set()
        for k in windows:
            members = window_tokens(k)
            assert (slots[members] == slots[members[0]]).all()  # the window became one token
            assert merge.representative[b, slots[members[0]]] == members[0]  # in its top-left slot
            grouped.update(members)
        others = [t for t in range(18) if t not in grouped]
        assert len(set(slots[others].tolist())) == len(others)  # everything else alone
    out, sizes = merge.merge(x, torch.ones(2, 18))
    for b, windows in enumerate(merged):
        for k in windows:
            slot = merge.index[b, window_tokens(k)[0]]
            torch.testing.assert_close(out[b, slot], x[b, window_tokens(k)].mean(0))
            assert sizes[b, slot] == 4


def test_no_window_reaches_tau_means_no_merge():
    x = torch.cat([torch.zeros(2, 2, D), torch.stack([grid_from_windows([SPREAD] * 4)] * 2)], dim=1)
    assert window_matching(x, (4, 4), 2, 0.5).num_out == 18
    # one sample without a candidate stops the whole batch (the count is the batch minimum)
    mixed = torch.cat([hand_made_batch()[:1], x[:1]])
    assert window_matching(mixed, (4, 4), 2, 0.5).num_out == 18


def test_odd_and_non_square_grids_merge_only_the_even_part():
    h, w, p = 5, 3, 1
    x = torch.randn(2, p + h * w, D)
    merge = window_matching(x, (h, w), p, -1.0)  # every window merges
    assert merge.num_out == p + h * w - 3 * 2  # 2 x 1 windows
    grid_slots = merge.index[:, p:].view(2, h, w)
    outside = torch.cat([grid_slots[:, 4, :], grid_slots[:, :4, 2]], dim=1)  # last row, last column
    counts = torch.stack([torch.bincount(row, minlength=merge.num_out) for row in merge.index])
    assert (counts.gather(1, outside) == 1).all()
    assert window_matching(torch.randn(1, 1 + 3, D), (1, 3), 1, -1.0).num_out == 4  # no window at all


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    p=st.integers(0, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    tau=st.floats(-0.2, 0.6),
    seed=st.integers(0, 2**16),
)
def test_window_matching_invariants(b, p, h, w, tau, seed):
    g = torch.Generator().manual_seed(seed)
    # 3-d features: windows range from similar to dissimilar
    x = torch.randn(b, p + h * w, 3, generator=g)
    merge = window_matching(x, (h, w), p, tau)
    sim = window_similarity(x, (h, w), p).flatten(1)
    r = (p + h * w - merge.num_out) // 3
    assert p + h * w - merge.num_out == 3 * r
    assert r == (int((sim >= tau).sum(1).min()) if sim.shape[1] else 0)
    sizes = merge.merge(x, torch.ones(b, p + h * w))[1]
    assert torch.equal(sizes.sum(1), torch.full((b,), float(p + h * w)))
    assert set(sizes.flatten().tolist()) <= {1.0, 4.0}
    assert torch.equal(merge.index[:, :p], torch.arange(p).expand(b, p))
    for i in range(b):
        windows = [k for k in range(sim.shape[1]) if len(set(merge.index[i, window_tokens(k, w, p)].tolist())) == 1]
        assert len(windows) == r and all(sim[i, k] >= tau for k in windows)
        # the chosen windows are the most similar ones
        if r:
            others = [k for k in range(sim.shape[1]) if k not in windows]
            assert all(sim[i, k] <= min(sim[i, j] for j in windows) for k in others)


def test_adaptive_global_count_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    p, n, layer = 1, 23, 5
    metric = torch.randn(3, p + n, 8, generator=g, dtype=torch.float64)
    node_max = torch.zeros(3, 12, dtype=torch.float64)
    for b, a in itertools.product(range(3), range(12)):
        node_max[b, a] = max(
            F.cosine_similarity(metric[b, p + 2 * a], metric[b, p + 2 * j + 1], dim=0) for j in range(11)
        )
    means = [row.mean() for row in node_max]
    stds = [((row - row.mean()) ** 2).sum().div(11).sqrt() for row in node_max]  # unbiased
    threshold = sum(means) / 3 + sum(stds) / 3 / layer
    r = min(int((row >= threshold).sum()) for row in node_max)
    assert 0 < r < 12
    merge = adaptive_bipartite_matching(metric, p, layer)
    assert merge.num_out == p + n - r
    assert torch.equal(merge.index, bipartite_soft_matching(metric, r, p).index)  # the top-r edges


def test_local_reducer_uses_the_features_and_needs_the_full_grid():
    x = hand_made_batch()
    ctx = TokenContext(num_prefix=2, grid=(4, 4), rope=rope_tables((4, 4), 4, 100.0))
    out, unmerge = LocalMergeReducer(0.9, proportional_attention=False)(x, None, ctx)
    assert out.shape == (2, 15, D) and unmerge(out).shape == (2, 18, D)
    assert ctx.rope[0].shape == (2, 13, 4) and ctx.attn_bias is None
    assert sorted(ctx.store["sizes"][0].tolist()) == [1.0] * 14 + [4.0]
    with pytest.raises(UserError, match="ALGM local merging needs the full token grid"):
        LocalMergeReducer(0.9, proportional_attention=False)(out, None, ctx)


@pytest.mark.parametrize("pos, registers", [("ape", 0), ("rope", 4), ("none", 4), ("rope", 0)])
def test_algm_on_a_segmenter_keeps_logits_and_state(pos, registers, one_thread):
    torch.manual_seed(0)
    model = build_model(
        "vit_segmenter", num_classes=4, backbone="vit_ti16", depth=4, pos=pos, num_register_tokens=registers
    ).eval()
    install_algm(model, tau=-1.0, global_block=2)  # every window merges in block 0
    h, w = 5, 6
    x = torch.randn(2, 3, 16 * h, 16 * w)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 4, 16 * h, 16 * w) and torch.isfinite(logits).all()
    total = 1 + registers + h * w
    counts = reduced_token_counts(model, x)
    assert counts[0].attention == total and counts[0].mlp == total - 3 * 2 * 3
    assert counts[1].attention == counts[1].mlp == counts[2].attention
    assert counts[2].mlp < counts[2].attention and counts[3].mlp == counts[2].mlp
    vit = find_vit(model)
    assert [type(b.token_reducer).__name__ for b in vit.blocks] == [
        "LocalMergeReducer", "NoneType", "GlobalMergeReducer", "NoneType"
    ]
    assert vit.blocks[2].token_reducer.layer_number == 3  # the paper's 1-based block number


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=1.5), "ALGM tau=1.5"),
        (dict(tau="0.9"), "ALGM tau='0.9'"),
        (dict(local_block=2, global_block=1), "expected 0 <= local < global < depth 3"),
        (dict(global_block=3), "expected 0 <= local < global < depth 3"),
        (dict(local_block=-1), "expected 0 <= local < global"),
        (dict(global_block=1.0), "expected 0 <= local < global"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with torch.device("meta"):  # the arguments are checked before anything runs
        model = build_model("vit_segmenter", num_classes=3, backbone="vit_ti16", depth=3)
    with pytest.raises(UserError, match=message):
        install_algm(model, **kwargs)


def test_models_without_a_vit_are_refused():
    with torch.device("meta"):
        model = build_model("unet", num_classes=3, base_width=4, depth=2)
    with pytest.raises(UserError, match="token merging needs a ViT backbone"):
        install_algm(model)


def test_local_merge_after_another_reduction_is_refused():
    model = build_model("vit_segmenter", num_classes=3, backbone="vit_ti16", depth=3).eval()
    vit = find_vit(model)
    vit.blocks[0].token_reducer = ToMeReducer(2, proportional_attention=True)
    vit.blocks[1].token_reducer = LocalMergeReducer(0.5, proportional_attention=False)
    with pytest.raises(UserError, match="needs the full token grid"):
        model(torch.randn(1, 3, 64, 64))


def test_flops_on_images_follow_the_content():
    """ALGM's work depends on the image: count_flops on given images must equal the hand formula on
    the token counts of that forward plus the matching matmuls (window Gram matrices, bipartite
    scores on features), and a flat image costs less than noise."""
    torch.manual_seed(0)
    c, hidden, batch = 16, 64, 2
    model = ViT(ViTConfig(patch_size=4, embed_dim=c, depth=3, num_heads=2, pos="none")).eval()
    install_algm(model, tau=0.99, local_block=0, global_block=1)
    # constant over each 8 x 8 block = each 2 x 2 window of patches: windows hold identical tokens
    flat = torch.randn(batch, 3, 2, 1, 2, 1).expand(-1, -1, -1, 8, -1, 8).reshape(batch, 3, 16, 16)
    counts = reduced_token_counts(model, flat)
    assert counts[0].attention == 17 and counts[0].mlp == 1 + 4  # all four windows merged
    expected = 2 * batch * 16 * c * 3 * 4 * 4  # patch embedding
    for tokens in counts:
        expected += 2 * batch * tokens.attention * 4 * c * c + 4 * batch * tokens.attention**2 * c
        expected += 2 * batch * tokens.mlp * 2 * hidden * c
    expected += 2 * batch * 4 * 4 * 4 * c  # block 0: a 4 x 4 Gram matrix per window
    patches = counts[1].attention - 1
    expected += 2 * batch * ((patches + 1) // 2) * (patches // 2) * c  # block 1: bipartite scores
    assert count_flops(model, flat) == expected
    assert count_flops(model, flat) < count_flops(model, (batch, 3, 16, 16))
