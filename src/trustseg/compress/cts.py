"""Content-aware Token Sharing (CTS; Lu, de Geus and Dubbelman, "Content-aware Token Sharing for
Efficient Semantic Segmentation with Vision Transformers", CVPR 2023) on the ViT's input tokens.

A policy network (``compress/policy.py``) scores every 2x2 window of patches ("superpatch") by how
likely it holds a single class; the K best-scored windows of each image are *shared*: their four patch
tokens become one token, so the blocks run on N - 3K patch tokens. K is fixed (CTS's
``num-tokens-shared``), so every image of a batch keeps the same number of tokens.

- Embedding of a shared token, as CTS does it: the window's 2p x 2p pixels are downsampled by 2 and
  embedded by the same patch embedding, plus the mean of the four absolute position embeddings (CTS
  groups the position-embedding grid like the image). CTS downsamples bilinearly by 0.5 with
  ``align_corners=False``, which samples every output pixel halfway between four input pixels: exactly
  a 2x2 average pooling, which is what is computed. This needs the image, not only its tokens: the
  reducer reads it from a forward pre-hook on ``ViT.patch_embed`` (no change to the ViT or segmenter).
- RoPE (pos="rope"): a shared token turns with the mean position of its four patches (the table of
  that coordinate, ``rope_at``); kept tokens keep their own tables. CTS has no RoPE; this is the
  position the shared token's pixels are centred on.
- Unsharing: ``forward_tokens`` applies the unmerge, which copies each shared token's output to its
  four positions, so every returned tensor (and the head) is on the full patch grid. CTS bilinearly
  upsamples the grid of shared-token features by 2 instead, which blends a window's output with its
  neighbours'; a copy keeps each position's value that of the one token that stands for it, as the
  ToMe/ALGM unmerges do, and the head's logits are upsampled bilinearly anyway.
- Token layout after sharing: ``[prefix, kept patches (grid order), shared windows (window order)]``.

The policy is frozen (it runs under ``no_grad``); the ViT may be fine-tuned with CTS installed, as CTS
fine-tunes its segmenter. With K = 0 nothing is shared and the forward is bit-identical to no reducer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.compress.merging import take_rows
from trustseg.compress.policy import PolicyNet, policy_from_state, train_policy, window_grid
from trustseg.compress.reducers import find_vit
from trustseg.data.base import SegmentationDataset
from trustseg.engine.checkpoint import Checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.vit import TokenContext, Unmerge, ViT, patch_centres, resample_pos_embed, rope_at

# ---------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------


def window_patches(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(h2*w2, 4) row-major patch indices of each 2x2 window (windows row-major; top-left, top-right,
    bottom-left, bottom-right), over the even part of the (h, w) grid."""
    h, w = grid
    h2, w2 = h // 2, w // 2
    top_left = (torch.arange(h2, device=device)[:, None] * 2 * w + torch.arange(w2, device=device) * 2).reshape(-1)
    offsets = torch.tensor([0, 1, w, w + 1], device=device)
    return top_left[:, None] + offsets


@dataclass(frozen=True)
class Sharing:
    """Which tokens one sharing step keeps and shares.

    Attributes:
        kept: (B, N_patch - 4K) indices of the patches kept as tokens, increasing.
        shared: (B, K) indices of the shared windows, increasing.
        index: (B, P + N_patch) the output token of every input token (P prefix tokens first).
    """

    kept: Tensor
    shared: Tensor
    index: Tensor


def plan_sharing(scores: Tensor, k: int, grid: tuple[int, int], num_prefix: int) -> Sharing:
    """Share the `k` windows of highest score per image; scores (B, h2*w2), one per window."""
    b = scores.shape[0]
    device = scores.device
    n = grid[0] * grid[1]
    windows = window_patches(grid, device)
    shared = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, K)
    covered = windows[shared].reshape(b, 4 * k)  # (B, 4K) patches of the shared windows
    is_shared = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, covered, True)
    kept = is_shared.to(torch.int8).argsort(dim=1, stable=True)[:, : n - 4 * k]  # the unshared, in grid order
    slots = torch.empty(b, n, dtype=torch.long, device=device)
    slots.scatter_(1, kept, torch.arange(n - 4 * k, device=device).expand(b, -1))
    window_slots = torch.arange(n - 4 * k, n - 3 * k, device=device).repeat_interleave(4).expand(b, -1)
    slots.scatter_(1, covered, window_slots)
    prefix = torch.arange(num_prefix, device=device).expand(b, -1)
    return Sharing(kept=kept, shared=shared, index=torch.cat([prefix, slots + num_prefix], dim=1))


def share_tokens(x: Tensor, window_tokens: Tensor, plan: Sharing, num_prefix: int) -> Tensor:
    """x (B, P + N_patch, C), window_tokens (B, h2*w2, C) (a candidate shared token per window)
    -> (B, P + N_patch - 3K, C): prefix, kept patches, shared windows; kept tokens are copied exactly."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    return torch.cat([prefix, take_rows(patches, plan.kept), take_rows(window_tokens, plan.shared)], dim=1)


def unshare(y: Tensor, plan: Sharing) -> Tensor:
    """(B, P + N_patch - 3K, D) -> (B, P + N_patch, D): each shared token copied to its four patches."""
    return take_rows(y, plan.index)


def window_centres(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(h2*w2, 2) mean normalised (row, col) of each window's four patch centres."""
    return patch_centres(grid, device)[window_patches(grid, device)].mean(dim=1)


def shared_rope(rope: tuple[Tensor, Tensor], plan: Sharing, grid: tuple[int, int], head_dim: int,
                theta: float) -> tuple[Tensor, Tensor]:
    """Per-image RoPE tables (B, N_patch - 3K, head_dim) of the patch tokens after sharing: kept patches
    keep their rows of `rope`, a shared window gets the table of its mean position."""
    cos, sin = rope_at(window_centres(grid, plan.shared.device)[plan.shared], head_dim, theta)
    return (torch.cat([take_rows(rope[0], plan.kept), cos], dim=1),
            torch.cat([take_rows(rope[1], plan.kept), sin], dim=1))


def window_embeddings(vit: ViT, images: Tensor, grid: tuple[int, int]) -> Tensor:
    """images (B, C_in, H, W) -> (B, h2*w2, C): each window's pixels downsampled by 2 (2x2 mean) and
    patch-embedded, plus the mean absolute position embedding of its four patches (CTS)."""
    side = 2 * vit.config.patch_size
    h2, w2 = window_grid(grid, 1)
    down = F.avg_pool2d(images[..., : h2 * side, : w2 * side], 2)
    tokens = vit.patch_embed.forward(down).flatten(2).transpose(1, 2)  # .forward: the pre-hook stays out of it
    if vit.pos_embed is not None:
        ape = resample_pos_embed(vit.pos_embed, grid, antialias=vit.config.pos_antialias)
        tokens = tokens + ape[:, window_patches(grid, images.device)].mean(dim=2)
    return tokens


# ---------------------------------------------------------------------------------------------------
# The input reducer
# ---------------------------------------------------------------------------------------------------


def _identity(y: Tensor) -> Tensor:
    return y


class TokenSharing:
    """``ViT.input_reducer`` sharing the `k` windows the `policy` scores highest (see the module doc)."""

    def __init__(self, vit: ViT, policy: PolicyNet, k: int) -> None:
        self.vit, self.policy, self.k = vit, policy.eval().requires_grad_(False), k
        self._images: Tensor | None = None
        self._hook = vit.patch_embed.register_forward_pre_hook(self._remember_images)

    def _remember_images(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if self.vit.input_reducer is self:
            self._images = args[0]

    def detach(self) -> None:
        """Remove the hook on the patch embedding."""
        self._hook.remove()
        self._images = None

    def __call__(self, x: Tensor, keys: Tensor | None, ctx: TokenContext) -> tuple[Tensor, Unmerge]:
        images, self._images = self._images, None
        if images is None:
            raise RuntimeError("CTS: the patch embedding saw no images in this forward")
        if self.k == 0:
            return x, _identity
        cfg = self.vit.config
        h2, w2 = window_grid(ctx.grid, 1)  # the windows of the patch grid
        if self.k > h2 * w2:
            raise UserError(f"cts: k={self.k} shared superpatches, but a {images.shape[-2]}x{images.shape[-1]} "
                            f"input has only {h2 * w2} 2x2 windows of patches; use k <= {h2 * w2} or larger images")
        if next(self.policy.parameters()).device != images.device:
            self.policy.to(images.device)  # the policy is not a submodule of the model: follow its device
        with torch.no_grad():
            scores = self.policy(images, cfg.patch_size).flatten(1).float()
        plan = plan_sharing(scores, self.k, ctx.grid, ctx.num_prefix)
        if ctx.rope is not None:
            ctx.rope = shared_rope(ctx.rope, plan, ctx.grid, cfg.head_dim, cfg.rope_theta)
        tokens = window_embeddings(self.vit, images, ctx.grid).to(x.dtype)
        return share_tokens(x, tokens, plan, ctx.num_prefix), partial(unshare, plan=plan)


def _cts_vit(model: nn.Module) -> ViT:
    return find_vit(model, "CTS")


def _check_k(k: Any) -> int:
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
        raise UserError(f"cts: k={k!r}; expected an int >= 0 (the number of shared 2x2 superpatches)")
    return k


def install_cts(model: nn.Module, policy: PolicyNet, k: int) -> nn.Module:
    """Share `k` superpatches per image at the input of the ViT of `model` (replacing an earlier CTS);
    returns `model`. The policy follows the images' device at each forward."""
    vit = _cts_vit(model)
    _check_k(k)
    if not isinstance(policy, PolicyNet):
        raise UserError(f"cts: policy must be a PolicyNet (compress/policy.py), got {type(policy).__name__}")
    remove_cts(model)
    if vit.input_reducer is not None:
        raise UserError("cts: the ViT already has another input reducer; remove it first")
    vit.input_reducer = TokenSharing(vit, policy, k)
    return model


def remove_cts(model: nn.Module) -> nn.Module:
    """Take CTS off the ViT of `model` (nothing happens without it); returns `model`."""
    vit = _cts_vit(model)
    if isinstance(vit.input_reducer, TokenSharing):
        vit.input_reducer.detach()
        vit.input_reducer = None
    return model


def cts_checkpoint(
    checkpoint: Checkpoint,
    k: int,
    *,
    dataset: SegmentationDataset | None = None,
    steps: int = 500,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint with CTS recorded: ``model["token_reduction"] = "cts:k=K"`` and the policy's weights
    in ``token_policy``. A policy the checkpoint already holds is kept; otherwise one is trained on
    `dataset` (see :func:`train_policy`) with the checkpoint's normalisation and ignore label.
    Returns (checkpoint, report of the policy training, or ``{"policy": "kept"}``)."""
    name = checkpoint.model["name"]
    if name != "vit_segmenter":
        raise UserError(f"{checkpoint.source}: CTS needs a ViT backbone; model {name!r} has none")
    _check_k(k)
    if checkpoint.model.get("token_reduction") is not None:
        raise UserError(f"{checkpoint.source} already reduces tokens ({checkpoint.model['token_reduction']}); "
                        "compress its uncompressed checkpoint instead")
    if checkpoint.token_policy is not None:
        policy_from_state(checkpoint.token_policy, source=f"the CTS policy of {checkpoint.source}")  # it must fit
        state, report = checkpoint.token_policy, {"policy": "kept"}
    else:
        if dataset is None:
            raise UserError(f"{checkpoint.source} has no CTS policy; training one needs a labelled dataset")
        with torch.device("meta"):  # only the patch size is needed: no memory, no weights
            vit = _cts_vit(build_model(name, num_classes=checkpoint.classes.num_classes,
                                       **checkpoint.model.get("options", {})))
        policy, report = train_policy(dataset, vit.config.patch_size, steps=steps, batch_size=batch_size,
                                      mean=checkpoint.mean, std=checkpoint.std,
                                      ignore_index=checkpoint.classes.ignore_index, seed=seed, device=device)
        state = {key: value.detach().cpu() for key, value in policy.state_dict().items()}
    compressed = dataclasses.replace(checkpoint, model={**checkpoint.model, "token_reduction": f"cts:k={k}"},
                                     token_policy=state)
    return compressed, report
