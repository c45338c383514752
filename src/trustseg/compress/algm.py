"""ALGM on our ViT (Norouzi, Orlova, de Geus, Dubbelman, "Adaptive Local-then-Global Token Merging
for Efficient Semantic Segmentation with Plain ViTs", CVPR 2024).

Two blocks merge, each between its attention residual and its MLP, on the token features (not keys):
1. the local block merges 2x2 windows of the patch grid whose mean off-diagonal cosine similarity is
   >= tau (the same count in every sample: the batch minimum, most similar windows first);
2. the global block runs bipartite matching with the adaptive count of
   ``merging.adaptive_bipartite_matching`` (threshold mean + std / block number).
The paper's blocks are 1 and 5 (1-based) for ViT-Ti/S/B, 1 and 7 for ViT-L; here blocks are
0-based, like ``ViT.forward_tokens``' layer indices, so the defaults are 0 and 4.

The authors' code has a proportional-attention flag but its attention ignores the sizes, so the
default here is off too. Our grids may be non-square and odd: windows cover the even part only.
"""

from __future__ import annotations

from torch import Tensor, nn

from trustseg.compress.merging import adaptive_bipartite_matching, window_matching
from trustseg.compress.reducers import apply_merge, clear_block_reducers, find_vit
from trustseg.errors import UserError
from trustseg.models.vit import TokenContext, Unmerge

# tau the paper tuned per backbone (ADE20K; Cityscapes ViT-S uses 0.955)
PAPER_TAU = {"vit_ti16": 0.90, "vit_s16": 0.88, "vit_b16": 0.94}


class LocalMergeReducer:
    """ALGM stage 1: merge similar 2x2 windows; must be the first reduction of the forward."""

    def __init__(self, tau: float, *, proportional_attention: bool) -> None:
        self.tau = tau
        self.proportional_attention = proportional_attention

    def __call__(self, x: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
        h, w = ctx.grid
        if x.shape[1] != ctx.num_prefix + h * w:
            raise UserError("ALGM local merging needs the full token grid; install it before any other token reduction")
        merge = window_matching(x, ctx.grid, ctx.num_prefix, self.tau)
        return apply_merge(x, merge, ctx, proportional_attention=self.proportional_attention)

    def __repr__(self) -> str:
        return f"LocalMergeReducer(tau={self.tau})"


class GlobalMergeReducer:
    """ALGM stage 2: bipartite matching on features with the adaptive count of block ``layer_number`` (1-based)."""

    def __init__(self, layer_number: int, *, proportional_attention: bool) -> None:
        self.layer_number = layer_number
        self.proportional_attention = proportional_attention

    def __call__(self, x: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
        merge = adaptive_bipartite_matching(x, ctx.num_prefix, self.layer_number)
        return apply_merge(x, merge, ctx, proportional_attention=self.proportional_attention)

    def __repr__(self) -> str:
        return f"GlobalMergeReducer(layer_number={self.layer_number})"


def install_algm(
    model: nn.Module,
    tau: float = PAPER_TAU["vit_s16"],
    *,
    local_block: int = 0,
    global_block: int | None = None,
    proportional_attention: bool = False,
) -> None:
    """Install ALGM on the ViT of ``model`` (a ViT or a segmenter holding one), replacing the reducers
    its blocks had.

    Args:
        tau: cosine-similarity threshold of a 2x2 window, in [-1, 1] (``PAPER_TAU`` lists the paper's).
        local_block, global_block: 0-based blocks of the local and the global stage, local first;
            global_block None is the paper's block 4, or the last block of a ViT shallower than 5.
        proportional_attention: add log(size) to the attention logits of merged keys.
    """
    vit = find_vit(model)
    depth = vit.config.depth
    if global_block is None:
        global_block = min(4, depth - 1)
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not -1.0 <= tau <= 1.0:
        raise UserError(f"ALGM tau={tau!r}; expected a cosine similarity in [-1, 1] (the paper uses 0.88-0.955)")
    blocks_are_ints = all(isinstance(i, int) and not isinstance(i, bool) for i in (local_block, global_block))
    if not blocks_are_ints or not 0 <= local_block < global_block < depth:
        raise UserError(
            f"ALGM blocks local={local_block}, global={global_block}; expected 0 <= local < global < depth {depth}"
        )
    clear_block_reducers(vit)
    vit.blocks[local_block].token_reducer = LocalMergeReducer(float(tau), proportional_attention=proportional_attention)
    vit.blocks[global_block].token_reducer = GlobalMergeReducer(
        global_block + 1, proportional_attention=proportional_attention
    )
