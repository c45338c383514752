"""Pure merge functions against a naive loop oracle and against the invariants of an assignment."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trustseg.compress.merging import (
    TokenMerge,
    bipartite_soft_matching,
    max_bipartite_r,
    merge_into,
    parse_r,
)
from trustseg.errors import UserError


def naive_bipartite(x, metric, sizes, r, p):
    """ToMe's step written as loops over one sample at a time: returns merged x and sizes."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        patches = list(range(p, n))
        side_a, side_b = patches[0::2], patches[1::2]
        r_b = min(r, len(patches) // 2)
        best = {}
        for a in side_a:
            sims = [F.cosine_similarity(metric[b, a], metric[b, j], dim=0).item() for j in side_b]
            k = max(range(len(sims)), key=sims.__getitem__)
            best[a] = (sims[k], side_b[k])
        merged_away = sorted(side_a, key=lambda a: -best[a][0])[:r_b]
        owner = {i: i for i in range(n)}
        for a in merged_away:
            owner[a] = best[a][1]
        rows, row_sizes = [], []
        for i in range(n):
            if owner[i] != i:
                continue
            members = [j for j in range(n) if owner[j] == i]
            total = sum(sizes[b, j].item() for j in members)
            rows.append(sum(sizes[b, j] * x[b, j] for j in members) / total)
            row_sizes.append(total)
        xs.append(torch.stack(rows))
        ss.append(torch.tensor(row_sizes, dtype=sizes.dtype))
    return torch.stack(xs), torch.stack(ss)


@pytest.mark.parametrize("b, p, n, r", [(1, 0, 9, 3), (2, 1, 16, 5), (3, 5, 11, 100), (2, 2, 7, 0)])
def test_bipartite_merge_is_the_size_weighted_mean_of_its_sources(b, p, n, r):
    g = torch.Generator().manual_seed(n * 10 + r)
    x = torch.randn(b, n, 6, generator=g, dtype=torch.float64)
    metric = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 5, (b, n), generator=g).double()
    merge = bipartite_soft_matching(metric, r, p)
    got_x, got_sizes = merge.merge(x, sizes)
    want_x, want_sizes = naive_bipartite(x, metric, sizes, r, p)
    assert got_x.shape == want_x.shape == (b, n - min(r, (n - p) // 2), 6)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_sizes, want_sizes)


def test_unmerge_after_merge_keeps_unmerged_tokens_exactly():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 8, generator=g)
    sizes = torch.randint(1, 7, (2, 21), generator=g).float()  # non-unit sizes: x * s / s would round
    merge = bipartite_soft_matching(torch.randn(2, 21, 5, generator=g), 6, 1)
    merged, _ = merge.merge(x, sizes)
    back = merge.unmerge(merged)
    alone = torch.bincount((merge.index + 100 * torch.arange(2)[:, None]).flatten(), minlength=200).view(2, 100)
    alone = alone.gather(1, merge.index) == 1
    # 6 of 20 patches merge into at most 6 others: at least 20 - 12 patches and the prefix stay alone
    assert alone.sum() >= 2 * (21 - 12) and (~alone).sum() >= 2 * 7
    assert torch.equal(back[alone], x[alone])
    # merged tokens all come back as the value of their slot
    assert torch.equal(back, merged.gather(1, merge.index[..., None].expand(-1, -1, 8)))


def test_merge_into_hand_example():
    # tokens 0..5; 1 -> 4 and 3 -> 4; kept: 0, 2, 4, 5 at slots 0..3
    merge = merge_into(6, torch.tensor([[1, 3]]), torch.tensor([[4, 4]]))
    assert merge.index.tolist() == [[0, 2, 1, 2, 2, 3]]
    assert merge.representative.tolist() == [[0, 2, 4, 5]]
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]]])
    merged, sizes = merge.merge(x, torch.tensor([[1.0, 1.0, 1.0, 2.0, 1.0, 1.0]]))
    assert merged.flatten().tolist() == [0.0, 2.0, (1 + 2 * 3 + 4) / 4, 5.0]
    assert sizes.tolist() == [[1.0, 1.0, 4.0, 1.0]]
    assert merge.unmerge(merged).flatten().tolist() == [0.0, 2.75, 2.0, 2.75, 2.75, 5.0]


def test_source_tracking_composes_steps():
    g = torch.Generator().manual_seed(0)
    n, p = 19, 2
    source = torch.arange(n).expand(3, n)
    sizes = torch.ones(3, n)
    x = torch.randn(3, n, 4, generator=g)
    for r in (4, 3, 5):
        merge = bipartite_soft_matching(torch.randn(3, x.shape[1], 4, generator=g), r, p)
        x, sizes = merge.merge(x, sizes)
        source = merge.track(source)
        counts = torch.stack([torch.bincount(s, minlength=x.shape[1]) for s in source]).float()
        assert torch.equal(counts, sizes)
        assert torch.equal(source[:, :p], torch.arange(p).expand(3, p))  # prefix stays put


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    p=st.integers(0, 4),
    n=st.integers(1, 24),
    r=st.integers(0, 30),
    seed=st.integers(0, 2**16),
)
def test_bipartite_assignment_invariants(b, p, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    total = p + n
    metric = torch.randn(b, total, 3, generator=g)
    merge = bipartite_soft_matching(metric, r, p)
    expected_out = total - min(r, n // 2)
    assert merge.num_out == expected_out and max_bipartite_r(total, p) == n // 2
    assert merge.index.shape == (b, total) and merge.index.min() >= 0 and merge.index.max() < max(expected_out, 1)
    # every slot holds at least its representative, which maps to that slot
    assert torch.equal(merge.index.gather(1, merge.representative), torch.arange(expected_out).expand(b, -1))
    # kept tokens stay in their original order
    assert (merge.representative.diff(dim=1) > 0).all()
    # prefix tokens: each alone in its own slot, in order
    assert torch.equal(merge.index[:, :p], torch.arange(p).expand(b, p))
    assert (merge.index[:, p:] >= p).all()
    # sizes are conserved and unmerge∘merge is exact for tokens left alone
    sizes = torch.randint(1, 4, (b, total), generator=g).float()
    x = torch.randn(b, total, 2, generator=g)
    merged, new_sizes = merge.merge(x, sizes)
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
    counts = torch.stack([torch.bincount(row, minlength=expected_out) for row in merge.index])
    alone = counts.gather(1, merge.index) == 1
    assert torch.equal(merge.unmerge(merged)[alone], x[alone])
    # a merged slot is a convex combination of its members: inside their range
    for i in range(b):
        for slot in range(expected_out):
            members = x[i][merge.index[i] == slot]
            if len(members) > 1:  # a group is one B (odd patch) token and the A tokens merged into it
                positions = (merge.index[i] == slot).nonzero().flatten() - p
                assert (positions % 2 == 1).sum() == 1
            assert (merged[i, slot] >= members.min(0).values - 1e-6).all()
            assert (merged[i, slot] <= members.max(0).values + 1e-6).all()


def test_identical_tokens_merge_to_themselves():
    """A token merged with an exact copy of itself (equal sizes) is unchanged."""
    base = torch.randn(1, 4, 8)
    x = torch.stack([base, base], dim=2).reshape(1, 8, 8)  # tokens 2j and 2j+1 equal
    merge = bipartite_soft_matching(x, 4, 0)
    merged, sizes = merge.merge(x, torch.ones(1, 8))
    torch.testing.assert_close(merged, base)
    assert sizes.tolist() == [[2.0] * 4]


def test_parse_r_forms():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(4, (3, 0.0)) == [3, 3, 3, 3]
    assert parse_r(3, (4, -1.0)) == [8, 4, 0]  # the paper's decreasing schedule
    assert parse_r(3, (4, 1.0)) == [0, 4, 8]
    assert parse_r(1, (5, 0.5)) == [2]
    assert parse_r(3, [1, 0, 2]) == [1, 0, 2]
    schedule = parse_r(12, (16, -0.5))
    assert schedule[0] > schedule[-1] and abs(sum(schedule) - 12 * 16) <= 12


@pytest.mark.parametrize("r", [-1, True, 2.5, "8", [1, 2], [1, -1, 0], (4, 2.0), (4.0, 0.5), (-2, 0.0), None])
def test_parse_r_rejects_bad_values(r):
    with pytest.raises(UserError, match="token merging r="):
        parse_r(3, r)


def test_identity_merge_is_frozen():
    merge = merge_into(3, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
    assert isinstance(merge, TokenMerge) and merge.num_out == 3
    assert merge.index.tolist() == [[0, 1, 2]] and merge.representative.tolist() == [[0, 1, 2]]
    with pytest.raises(AttributeError):
        merge.index = None  # type: ignore[misc]
