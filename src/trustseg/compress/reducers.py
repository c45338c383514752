"""Wiring shared by the token reducers: apply a ``TokenMerge`` to the ViT's per-forward state, find
the ViT inside a model, remove reducers, and count the tokens each block really processes.

Per-forward state lives in ``TokenContext.store`` (fresh for every forward):
- ``"sizes"`` (B, N) float32: how many original tokens each current token stands for;
- ``"source"`` (B, P + h*w) long: the current slot of every original token (source tracking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustseg.compress.merging import TokenMerge, take_rows
from trustseg.errors import UserError
from trustseg.models.vit import TokenContext, Unmerge, ViT


def _identity(y: Tensor) -> Tensor:
    return y


def apply_merge(
    x: Tensor, merge: TokenMerge, ctx: TokenContext, *, proportional_attention: bool
) -> tuple[Tensor, Unmerge]:
    """Merge x (B, N, C) -> (B, N', C) and keep the context consistent: sizes, sources, per-sample
    RoPE tables (a merged slot keeps its destination token's table), and with
    ``proportional_attention`` the attention bias log(size) per key (ToMe, Bolya et al. 2023, eq. 1).

    A step that merges nothing returns x itself and leaves the context untouched, so r = 0 is
    bit-identical to no reducer. A merge changes N, so a bias set earlier is replaced (or dropped).
    """
    b, n, _ = x.shape
    if merge.num_out == n:
        return x, _identity
    sizes = ctx.store.get("sizes")
    if sizes is None:
        sizes = torch.ones(b, n, dtype=torch.float32, device=x.device)
    source = ctx.store.get("source")
    if source is None:
        source = torch.arange(n, device=x.device).expand(b, n)
    x, sizes = merge.merge(x, sizes)
    ctx.store["sizes"] = sizes
    ctx.store["source"] = merge.track(source)
    if ctx.rope is not None:
        patch_slots = merge.representative[:, ctx.num_prefix:] - ctx.num_prefix
        ctx.rope = tuple(take_rows(table, patch_slots) for table in ctx.rope)  # type: ignore[assignment]
    ctx.attn_bias = sizes.log().to(x.dtype)[:, None, None, :] if proportional_attention else None
    return x, merge.unmerge


def find_vit(model: nn.Module, purpose: str = "token merging") -> ViT:
    """The ViT inside ``model`` (the model itself, or a segmenter's backbone); UserError naming `purpose`
    (the method that needs it) for a model without one."""
    if isinstance(model, ViT):
        return model
    found = [m for m in model.modules() if isinstance(m, ViT)]
    if not found:
        raise UserError(
            f"{purpose} needs a ViT backbone; {type(model).__name__} has none "
            "(use a vit_segmenter model, not a U-Net or SegFormer)"
        )
    if len(found) > 1:
        raise UserError(f"{purpose}: {type(model).__name__} holds {len(found)} ViTs; pass the one to reduce")
    return found[0]


def remove_token_reducers(model: nn.Module) -> None:
    """Take every token reducer off the model's ViT (blocks and input), restoring the plain forward."""
    vit = find_vit(model)
    detach = getattr(vit.input_reducer, "detach", None)  # an input reducer may hold hooks (CTS)
    if detach is not None:
        detach()
    vit.input_reducer = None
    clear_block_reducers(vit)


def clear_block_reducers(vit: ViT) -> None:
    """Take the reducers off the blocks; an input reducer (token sharing at the input) stays."""
    for block in vit.blocks:
        block.token_reducer = None


def patch_grid(vit: ViT, image_size: Sequence[int]) -> tuple[int, int]:
    """The patch grid (h, w) of an image of ``image_size`` (H, W); a UserError unless divisible."""
    if len(image_size) != 2 or any(not isinstance(s, int) or s < 1 for s in image_size):
        raise UserError(f"image_size={tuple(image_size)!r}; expected (H, W), two positive ints")
    p = vit.config.patch_size
    height, width = image_size
    if height % p or width % p:
        raise UserError(f"image_size {height}x{width} is not a multiple of the ViT's patch size {p}")
    return height // p, width // p


@dataclass(frozen=True)
class BlockTokens:
    """Tokens (prefix included) a block's attention and its MLP process."""

    attention: int
    mlp: int


def reduced_token_counts(model: nn.Module, images: Tensor | Sequence[int]) -> list[BlockTokens]:
    """Tokens per ViT block in one forward of ``model`` on ``images`` (B, 3, H, W), or on a random
    normal batch of that shape when a shape is given.

    ToMe's counts depend only on the image size; ALGM's depend on the content, so pass real images.
    ``models.flops.count_flops`` traces the forward, so its count already reflects the reduction
    (including the similarity matmuls of the matching).
    """
    vit = find_vit(model)
    param = next(model.parameters())
    if not isinstance(images, Tensor):
        images = torch.randn(*images, device=param.device, dtype=param.dtype)
    counts: dict[int, list[int]] = {i: [] for i in range(len(vit.blocks))}

    def counter(i: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            counts[i].append(args[0].shape[1])  # (B, N, C) tokens

        return hook

    handles = []
    for i, block in enumerate(vit.blocks):
        # the block sees the tokens before its reducer, its MLP after it
        handles += [block.register_forward_pre_hook(counter(i)), block.mlp.register_forward_pre_hook(counter(i))]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return [BlockTokens(attention=counts[i][0], mlp=counts[i][1]) for i in range(len(vit.blocks))]
