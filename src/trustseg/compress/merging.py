"""Token merging as pure tensor functions.

Methods (reimplemented from the papers):
- ToMe bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023);
- ALGM local 2x2-window merging and adaptive global matching (Norouzi et al., "Adaptive
  Local-then-Global Token Merging for Efficient Semantic Segmentation with Plain ViTs", CVPR 2024).

Every merge step is one *assignment*: input token ``i`` of sample ``b`` goes to output slot
``index[b, i]``. A slot holding several tokens becomes their size-weighted mean (``size`` = how many
original patches a token stands for), so a merged token is the mean of all the patches it covers.
``TokenMerge.merge`` and ``TokenMerge.unmerge`` are the merge/unmerge pair ToMe returns as closures;
keeping the assignment in a frozen dataclass makes it inspectable and lets the same two functions
serve every matching rule. Unmerge copies a slot back to each of its inputs, so chaining the unmerges
of all steps in reverse puts every merged token back at each of its source patches.

Token layout is ``[prefix (CLS, registers), patches]``; prefix tokens are never merged. All matching
functions return the same token count for every sample of the batch (batched tensors stay rectangular).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trustseg.errors import UserError


@dataclass(frozen=True)
class TokenMerge:
    """One merge step.

    Attributes:
        index: (B, N) long, the output slot of every input token.
        representative: (B, N') long, for each output slot the input token whose identity it keeps
            (its RoPE table): the token itself for kept tokens, the destination for merged slots.
    """

    index: Tensor
    representative: Tensor

    @property
    def num_out(self) -> int:
        return self.representative.shape[1]

    def merge(self, x: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Size-weighted mean per slot: x (B, N, C), sizes (B, N) -> (B, N', C), summed sizes (B, N').

        Weights are ``size / slot size``, so a token alone in its slot gets weight exactly 1 and is
        passed through bit for bit.
        """
        b, n, c = x.shape
        new_sizes = sizes.new_zeros(b, self.num_out).scatter_add_(1, self.index, sizes)
        weights = (sizes / new_sizes.gather(1, self.index)).to(x.dtype)
        out = x.new_zeros(b * self.num_out, c)
        out.index_add_(0, batch_rows(self.index, self.num_out), (x * weights[..., None]).reshape(b * n, c))
        return out.view(b, self.num_out, c), new_sizes

    def unmerge(self, y: Tensor) -> Tensor:
        """(B, N', D) -> (B, N, D): every input token gets the value of its slot."""
        return take_rows(y, self.index)

    def track(self, source: Tensor) -> Tensor:
        """Source tracking: ``source`` (B, M) = the slot of each of M original tokens before this step
        -> their slot after it (B, M)."""
        return self.index.gather(1, source)


def batch_rows(index: Tensor, rows: int) -> Tensor:
    """index (B, R) into each sample's `rows` rows -> (B * R,) into the rows of the (B * rows, ...) flattening.

    Moving whole rows with ``index_select`` / ``index_add_`` on the flattened tensor is many times faster
    on CPU than ``gather`` / ``scatter_add`` over an index expanded to (B, R, C), which go element by element.
    """
    if index.shape[0] == 1:
        return index.view(-1)
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows
    return (index + offsets).flatten()


def take_rows(table: Tensor, index: Tensor) -> Tensor:
    """Row ``index[b, r]`` of sample b's table: table (B, M, D), or (M, D) shared by the batch; index
    (B, R) long -> (B, R, D)."""
    b, r = index.shape
    d = table.shape[-1]
    if table.dim() == 2:
        return table.index_select(0, index.flatten()).view(b, r, d)
    return table.reshape(-1, d).index_select(0, batch_rows(index, table.shape[1])).view(b, r, d)


def merge_into(num_tokens: int, src: Tensor, dst: Tensor) -> TokenMerge:
    """The assignment where token ``src[b, j]`` merges into token ``dst[b, j]`` (both (B, r) long,
    positions among ``num_tokens``); all other tokens are kept, in their original order.

    ``src`` must hold distinct positions per sample and no ``dst`` may be a ``src``.
    """
    b, r = src.shape
    kept = torch.ones(b, num_tokens, dtype=torch.bool, device=src.device)
    kept.scatter_(1, src, False)
    slot = kept.long().cumsum(1) - 1
    index = slot.scatter(1, src, slot.gather(1, dst))
    # positions of kept tokens, in order: a stable sort puts kept (0) before merged-away (1); unlike
    # nonzero() it never waits for a GPU
    representative = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices[:, : num_tokens - r]
    return TokenMerge(index=index, representative=representative)


def _at_least_float32(t: Tensor) -> Tensor:
    """Similarities in float32 at least: bf16 cosines near 1 would tie."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _bipartite_scores(metric: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Alternate split of the patch tokens of metric (B, N, D) into A (even) and B (odd); for each
    A token its best cosine similarity to a B token and that B token's index: (B, |A|), (B, |A|)."""
    patches = F.normalize(_at_least_float32(metric[:, num_prefix:]), dim=-1)
    a, b = patches[:, ::2], patches[:, 1::2]
    return (a @ b.transpose(1, 2)).max(dim=-1)


def _merge_top_edges(node_max: Tensor, node_idx: Tensor, r: int, num_prefix: int, num_tokens: int) -> TokenMerge:
    """Merge the r A tokens with the most similar partners into those partners (ToMe's top-r edges)."""
    src = node_max.topk(r, dim=1).indices  # indices into A
    dst = node_idx.gather(1, src)  # indices into B
    return merge_into(num_tokens, num_prefix + 2 * src, num_prefix + 2 * dst + 1)


def max_bipartite_r(num_tokens: int, num_prefix: int) -> int:
    """The most tokens one bipartite step can merge: half the patch tokens (ToMe's bound)."""
    return max(num_tokens - num_prefix, 0) // 2


def identity_merge(batch: int, num_tokens: int, device: torch.device) -> TokenMerge:
    """The assignment that keeps every token."""
    src = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return merge_into(num_tokens, src, src)


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int) -> TokenMerge:
    """ToMe: merge ``r`` patch tokens (clipped to what the step can merge) into their most similar
    partner of the other half of an alternate split; similarity is cosine on ``metric`` (B, N, D)."""
    b, n, _ = metric.shape
    r = min(r, max_bipartite_r(n, num_prefix))
    if r <= 0:
        return identity_merge(b, n, metric.device)
    node_max, node_idx = _bipartite_scores(metric, num_prefix)
    return _merge_top_edges(node_max, node_idx, r, num_prefix, n)


@torch.no_grad()
def adaptive_bipartite_matching(metric: Tensor, num_prefix: int, layer_number: int) -> TokenMerge:
    """ALGM's global stage: bipartite matching with an adaptive count.

    threshold = mean over the batch of each sample's mean best-match similarity + mean over the
    batch of each sample's (unbiased) std / ``layer_number`` (the 1-based block number); the count
    merged is the batch minimum of A tokens whose best match reaches the threshold (Norouzi et al.
    2024, global merging).
    """
    b, n, _ = metric.shape
    if max_bipartite_r(n, num_prefix) < 1:
        return identity_merge(b, n, metric.device)
    node_max, node_idx = _bipartite_scores(metric, num_prefix)
    if node_max.shape[1] < 2:  # no spread to measure
        return identity_merge(b, n, metric.device)
    threshold = node_max.mean(1).mean() + node_max.std(1).mean() / layer_number
    r = int((node_max >= threshold).sum(1).min())
    return _merge_top_edges(node_max, node_idx, r, num_prefix, n)


def window_similarity(metric: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
    """Mean off-diagonal cosine similarity of the 4 tokens of each 2x2 window of the patch grid.

    metric (B, P + h*w, D) in row-major patch order -> (B, h//2, w//2); an odd last row or column
    belongs to no window.
    """
    h, w = grid
    b, _, d = metric.shape
    windows = _windows(F.normalize(_at_least_float32(metric[:, num_prefix:]), dim=-1).view(b, h, w, d))
    gram = windows @ windows.transpose(-1, -2)  # (B, h//2, w//2, 4, 4)
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / 12


def _windows(t: Tensor) -> Tensor:
    """(B, h, w, D) -> (B, h//2, w//2, 4, D), window tokens ordered top-left, top-right, bottom-left, bottom-right."""
    b, h, w, d = t.shape
    h2, w2 = h // 2, w // 2
    t = t[:, : 2 * h2, : 2 * w2].reshape(b, h2, 2, w2, 2, d)
    return t.permute(0, 1, 3, 2, 4, 5).reshape(b, h2, w2, 4, d)


@torch.no_grad()
def window_matching(metric: Tensor, grid: tuple[int, int], num_prefix: int, tau: float) -> TokenMerge:
    """ALGM's local stage: each selected 2x2 window of the patch grid becomes one token.

    A window is a candidate when its ``window_similarity`` is >= ``tau``; every sample merges the
    batch-minimum count of candidates, choosing its most similar windows. The merged token takes
    the window's top-left slot. metric: (B, P + h*w, D), tokens still in grid order.
    """
    h, w = grid
    b, n, _ = metric.shape
    sim = window_similarity(metric, grid, num_prefix).flatten(1)  # (B, windows)
    r = int((sim >= tau).sum(1).min()) if sim.shape[1] else 0
    if r == 0:
        return identity_merge(b, n, metric.device)
    chosen = sim.topk(r, dim=1).indices
    w2 = w // 2
    top_left = num_prefix + 2 * (chosen // w2) * w + 2 * (chosen % w2)  # (B, r)
    offsets = torch.tensor([1, w, w + 1], device=metric.device)
    src = (top_left[..., None] + offsets).flatten(1)  # (B, 3r)
    dst = top_left.repeat_interleave(3, dim=1)
    return merge_into(n, src, dst)


def parse_r(depth: int, r: int | tuple[int, float] | Sequence[int]) -> list[int]:
    """Per-block merge counts from ToMe's three forms.

    - ``int``: the same r in every block;
    - ``(r, inflection)``: a linear schedule over the blocks from ``r * (1 - inflection)`` to
      ``2r - r * (1 - inflection)`` (so about ``depth * r`` in all; inflection -1 is the paper's
      decreasing schedule, 0 constant), inflection in [-1, 1];
    - a list of ``depth`` ints: one per block.
    """
    if isinstance(r, bool):
        raise UserError(f"token merging r={r!r}; expected an int, (r, inflection) or a list of ints")
    if isinstance(r, int):
        if r < 0:
            raise UserError(f"token merging r={r}; expected r >= 0")
        return [r] * depth
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], (int, float)) and not isinstance(r[1], bool):
        base, inflection = r
        if not isinstance(base, int) or isinstance(base, bool) or base < 0 or not -1 <= inflection <= 1:
            raise UserError(f"token merging r={r!r}; expected (r >= 0, inflection in [-1, 1])")
        first = int(base * (1 - inflection))
        last = 2 * base - first
        step = (last - first) / (depth - 1) if depth > 1 else 0.0
        return [int(first + step * i) for i in range(depth)]
    if isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) != depth or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
            raise UserError(f"token merging r={r!r}; a per-block list needs {depth} ints >= 0 (one per block)")
        return values
    raise UserError(f"token merging r={r!r}; expected an int, (r, inflection) or a list of ints")
