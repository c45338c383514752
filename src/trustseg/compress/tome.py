"""ToMe on our ViT: bipartite soft matching in every block (Bolya et al., "Token Merging: Your ViT
but Faster", ICLR 2023), between the attention residual and the MLP, on the block's keys averaged
over heads; merged tokens are unmerged to the full grid at the end, so dense heads see (B, h*w, C).

    schedule = install_tome(segmenter, r=16)        # every block merges 16 tokens
    install_tome(segmenter, r=(16, -1.0))           # ToMe's decreasing schedule
    remove_token_reducers(segmenter)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from trustseg.compress.merging import bipartite_soft_matching, parse_r
from trustseg.compress.reducers import apply_merge, clear_block_reducers, find_vit, patch_grid, remove_token_reducers
from trustseg.errors import UserError
from trustseg.models.vit import TokenContext, Unmerge

__all__ = ["ToMeReducer", "install_tome", "remove_token_reducers"]


class ToMeReducer:
    """The token reducer of one block: merges ``r`` tokens (fewer when the block has fewer to merge)."""

    def __init__(self, r: int, *, proportional_attention: bool) -> None:
        self.r = r
        self.proportional_attention = proportional_attention

    def __call__(self, x: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
        if keys is None:
            raise RuntimeError("ToMe merges on attention keys; it cannot be the ViT's input reducer")
        _check_r_fits(self.r, ctx.grid)
        merge = bipartite_soft_matching(keys.mean(1), self.r, ctx.num_prefix)
        return apply_merge(x, merge, ctx, proportional_attention=self.proportional_attention)

    def __repr__(self) -> str:
        return f"ToMeReducer(r={self.r}, proportional_attention={self.proportional_attention})"


def _check_r_fits(r: int, grid: tuple[int, int]) -> None:
    patches = grid[0] * grid[1]
    if r > patches:
        raise UserError(
            f"token merging r={r} is larger than the {patches} patch tokens of a {grid[0]}x{grid[1]} patch grid; "
            f"use r <= {patches // 2} (at most half the tokens merge in one block)"
        )


def install_tome(
    model: nn.Module,
    r: int | tuple[int, float] | Sequence[int] = 8,
    *,
    proportional_attention: bool = True,
    image_size: Sequence[int] | None = None,
) -> list[int]:
    """Install ToMe on the ViT of ``model`` (a ViT or a segmenter holding one), replacing the reducers
    its blocks had (an input reducer stays); returns the per-block r.

    Args:
        r: tokens merged per block: an int, ToMe's ``(r, inflection)`` schedule, or one int per block.
            Each block merges at most half of its patch tokens (r is clipped there).
        proportional_attention: add log(size) to the attention logits of merged keys (ToMe's default
            off the shelf; the paper turns it off for training MAE models).
        image_size: (H, W) the model will see; when given, an r larger than its patch count is
            rejected now instead of at the first forward.
    """
    vit = find_vit(model)
    schedule = parse_r(vit.config.depth, r)
    if image_size is not None:
        grid = patch_grid(vit, image_size)
        for value in schedule:
            _check_r_fits(value, grid)
    clear_block_reducers(vit)
    for block, value in zip(vit.blocks, schedule):
        if value > 0:
            block.token_reducer = ToMeReducer(value, proportional_attention=proportional_attention)
    return schedule
