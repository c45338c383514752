"""A plain Vision Transformer for dense prediction, readable top to bottom.

Positional information is one of ``pos``:
- ``"ape"``: a learned absolute embedding on a square ``pos_grid`` (the pretraining grid), bicubically
  resampled to the input's patch grid (the DINOv2 convention, Oquab et al. 2023);
- ``"rope"``: 2-D axial rotary embedding on queries and keys of patch tokens, with patch-centre
  coordinates normalised to [-1, 1] so any grid size is valid (the DINOv3 convention, Siméoni et al. 2025);
- ``"none"``: no injected position at all (as trained with Active Spatial Guidance, Liu et al. 2026).

Token layout: ``[CLS?, registers..., patches...]``; the "prefix" tokens carry no position.

Structurally pruned models (``compress/prune.py``) keep the width and head size but may have fewer
heads and MLP hidden units per block: ``block_heads`` and ``block_mlp_hidden`` give one count per block.

Token reduction (ToMe, ALGM, CTS) plugs in through ONE hook per block, ``Block.token_reducer``, called
after the attention residual and before the MLP (where ToMe and ALGM merge), plus the same hook on the
input tokens, ``ViT.input_reducer`` (where CTS shares tokens). A reducer is any callable

    reducer(x (B, N, C), keys (B, heads, N, head_dim) | None, ctx: TokenContext)
        -> (x_reduced (B, N', C), unmerge: (B, N', D) -> (B, N, D))

``keys`` are this block's attention keys before RoPE (ToMe's similarity metric); prefix tokens are
the first ``ctx.num_prefix`` tokens and should be kept. A reducer that changes N must keep the
per-token state consistent: ``ctx.rope`` (tables of the kept/merged patch tokens, needed for
pos="rope") and ``ctx.attn_bias`` (an additive per-key bias used by all later blocks, e.g. ToMe's
proportional attention log(size)); it may keep its own per-forward state (sizes, sources) in
``ctx.store``. ``forward_tokens`` applies the recorded unmerges in reverse, so
every returned tensor is on the full token grid. With no reducer installed the cost is one ``if``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.models.shapes import check_input_size

Pos = Literal["ape", "rope", "none"]
Unmerge = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3
    cls_token: bool = True
    num_register_tokens: int = 0
    pos: Pos = "ape"
    pos_grid: int = 14  # side of the square patch grid the absolute embedding was trained on
    pos_antialias: bool = False  # DINOv2-with-registers resamples the APE with antialias=True
    rope_theta: float = 100.0  # DINOv3's RoPE base period
    layerscale: float | None = None  # initial LayerScale value (Touvron et al. 2021); None = no LayerScale
    norm_eps: float = 1e-6
    drop_path: float = 0.0  # stochastic depth rate of the last block, linearly increasing from 0
    block_heads: tuple[int, ...] | None = None  # heads per block (pruned models); None = num_heads everywhere
    block_mlp_hidden: tuple[int, ...] | None = None  # MLP hidden units per block; None = embed_dim * mlp_ratio

    def __post_init__(self) -> None:
        for name in ("patch_size", "embed_dim", "depth", "num_heads", "pos_grid"):
            if getattr(self, name) < 1:
                raise UserError(f"ViTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_register_tokens < 0 or not 0.0 <= self.drop_path < 1.0:
            raise UserError("ViTConfig: num_register_tokens must be >= 0 and drop_path in [0, 1)")
        if self.pos not in ("ape", "rope", "none"):
            raise UserError(f"ViTConfig.pos={self.pos!r}; expected 'ape', 'rope' or 'none'")
        if self.embed_dim % self.num_heads:
            raise UserError(f"ViTConfig: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise UserError(f"ViTConfig: 2-D RoPE needs head_dim divisible by 4, got {self.embed_dim // self.num_heads}")
        for name in ("block_heads", "block_mlp_hidden"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.depth or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes)):
                raise UserError(f"ViTConfig.{name} must hold one int >= 1 per block ({self.depth}), got {sizes!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def heads(self, block: int) -> int:
        """Attention heads of block `block` (each of ``head_dim`` channels)."""
        return self.num_heads if self.block_heads is None else self.block_heads[block]

    def mlp_hidden(self, block: int) -> int:
        """MLP hidden units of block `block`."""
        return int(self.embed_dim * self.mlp_ratio) if self.block_mlp_hidden is None else self.block_mlp_hidden[block]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.num_register_tokens


@dataclass
class TokenContext:
    """Per-forward state shared by the blocks (and by token reducers)."""

    num_prefix: int
    grid: tuple[int, int]
    rope: tuple[Tensor, Tensor] | None = None  # (cos, sin), (N_patch, head_dim) or (B, N_patch, head_dim)
    attn_bias: Tensor | None = None  # additive attention bias broadcastable to (B, heads, N, N)
    unmerges: list[Unmerge] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=dict)

    def restore(self, x: Tensor) -> Tensor:
        """Undo every reduction so far: (B, N', D) -> (B, N_full, D)."""
        for unmerge in reversed(self.unmerges):
            x = unmerge(x)
        return x


TokenReducer = Callable[[Tensor, "Tensor | None", TokenContext], tuple[Tensor, Unmerge]]


# ---------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------


def resample_pos_embed(pos_embed: Tensor, grid: tuple[int, int], *, antialias: bool = False) -> Tensor:
    """(1, G*G, C) square-grid embedding -> (1, h*w, C), bicubic in float32 (no-op on the same grid)."""
    n, c = pos_embed.shape[1:]
    side = math.isqrt(n)
    if grid == (side, side):
        return pos_embed
    x = pos_embed.reshape(1, side, side, c).permute(0, 3, 1, 2).float()
    # align_corners=False and an explicit output size, as DINOv2 in transformers does
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos_embed.dtype)


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """2-D axial RoPE (cos, sin), each (h*w, head_dim), of the patch centres in row-major order."""
    return rope_at(patch_centres(grid, device), head_dim, theta)


def patch_centres(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(h*w, 2) (row, col) of the patch centres, normalised to [-1, 1] per axis, in row-major order."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


def rope_at(coords: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """2-D axial RoPE (cos, sin), each (..., head_dim), at positions coords (..., 2) = (row, col) in the
    normalised frame of ``patch_centres`` (any position, e.g. the centre of several patches).

    The first half of the channel pairs turns with the row coordinate, the second half with the column
    coordinate; angles are ``2*pi*coord/period`` with periods ``theta ** (4 i / head_dim)`` (DINOv3).
    Channel j is paired with j + head_dim/2.
    """
    inv_period = theta ** -(torch.arange(head_dim // 4, dtype=torch.float32, device=coords.device) * 4 / head_dim)
    angles = (2 * math.pi * coords[..., None] * inv_period).flatten(-2)  # (..., head_dim/2): rows, then cols
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor], num_prefix: int) -> Tensor:
    """Rotate the patch tokens of x (B, heads, N, head_dim); prefix tokens pass unchanged."""
    cos, sin = (t.to(x.dtype) for t in rope)
    if cos.dim() == 3:  # per-sample tables (after token reduction): (B, N, D) -> (B, 1, N, D)
        cos, sin = cos[:, None], sin[:, None]
    prefix, patches = x[..., :num_prefix, :], x[..., num_prefix:, :]
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([prefix, rotated], dim=-2) if num_prefix else rotated


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of ``cfg.head_dim`` channels (default ``cfg.num_heads``;
    a pruned block has fewer, so the inner width ``heads * head_dim`` may be below ``embed_dim``)."""

    def __init__(self, cfg: ViTConfig, heads: int | None = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads if heads is None else heads
        self.head_dim = cfg.head_dim
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * inner, bias=cfg.qkv_bias)
        self.proj = nn.Linear(inner, cfg.embed_dim)

    def forward(self, x: Tensor, ctx: TokenContext | None = None) -> tuple[Tensor, Tensor]:
        """x (B, N, C) -> (out (B, N, C), keys before RoPE (B, heads, N, head_dim))."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        keys = k
        bias = None
        if ctx is not None:
            if ctx.rope is not None:
                q, k = apply_rope(q, ctx.rope, ctx.num_prefix), apply_rope(k, ctx.rope, ctx.num_prefix)
            bias = ctx.attn_bias
        # SDPA: on CPU the flash kernel never materialises the N x N matrix; the scale is explicit so that
        # it is 1/sqrt(head_dim) whatever the inferred dims
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(self.head_dim))
        return self.proj(y.transpose(1, 2).reshape(b, n, -1)), keys


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block; `heads` and `mlp_hidden` default to the unpruned sizes of `cfg`."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0, *, heads: int | None = None,
                 mlp_hidden: int | None = None) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, heads)
        self.ls1 = LayerScale(dim, cfg.layerscale) if cfg.layerscale is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio) if mlp_hidden is None else mlp_hidden)
        self.ls2 = LayerScale(dim, cfg.layerscale) if cfg.layerscale is not None else nn.Identity()
        self.drop_path = drop_path
        self.token_reducer: TokenReducer | None = None

    def forward(self, x: Tensor, ctx: TokenContext | None = None) -> Tensor:
        y, keys = self.attn(self.norm1(x), ctx)
        x = x + drop_path(self.ls1(y), self.drop_path, self.training)
        if self.token_reducer is not None:
            if ctx is None:
                raise RuntimeError("a token reducer needs the TokenContext of ViT.forward_tokens")
            x, unmerge = self.token_reducer(x, keys, ctx)
            ctx.unmerges.append(unmerge)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.size_divisor = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        c = cfg.embed_dim
        self.patch_embed = nn.Conv2d(cfg.in_chans, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # A CLS position, where a checkpoint has one, is folded into cls_token when loading.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c)) if cfg.cls_token else None
        self.reg_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, c)) if cfg.num_register_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2, c)) if cfg.pos == "ape" else None
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, rate, heads=cfg.heads(i), mlp_hidden=cfg.mlp_hidden(i))
                                    for i, rate in enumerate(rates))
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.input_reducer: TokenReducer | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for tensor in (self.cls_token, self.reg_tokens, self.pos_embed):
            if tensor is not None:
                nn.init.trunc_normal_(tensor, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_tokens(self, x: Tensor, return_layers: Sequence[int] = ()) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        """images (B, C_in, H, W) -> (all tokens after the final norm (B, P + h*w, C), (h, w),
        raw outputs of the blocks in ``return_layers`` (B, P + h*w, C), in the order asked).

        P = ``num_prefix_tokens``. Layer indices may be negative (-1 = last block).
        """
        cfg = self.config
        check_input_size(x.shape[-2], x.shape[-1], cfg.patch_size, model="ViT")
        wanted = [self._layer_index(i) for i in return_layers]
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + resample_pos_embed(self.pos_embed, grid, antialias=cfg.pos_antialias)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_tokens) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        rope = rope_tables(grid, cfg.head_dim, cfg.rope_theta, x.device) if cfg.pos == "rope" else None
        ctx = TokenContext(num_prefix=self.num_prefix_tokens, grid=grid, rope=rope)
        if self.input_reducer is not None:
            x, unmerge = self.input_reducer(x, None, ctx)
            ctx.unmerges.append(unmerge)
        layers: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x, ctx)
            if i in wanted:
                layers[i] = ctx.restore(x)
        x = ctx.restore(self.norm(x))
        return x, grid, [layers[i] for i in wanted]

    def forward_features(self, x: Tensor, return_layers: Sequence[int] = ()) -> tuple[Tensor, tuple[int, int], list[Tensor]]:
        """images (B, C_in, H, W) -> (patch tokens after the final norm (B, h*w, C), (h, w),
        patch tokens of the blocks in ``return_layers``, before any norm, each (B, h*w, C))."""
        tokens, grid, layers = self.forward_tokens(x, return_layers)
        p = self.num_prefix_tokens
        return tokens[:, p:], grid, [t[:, p:] for t in layers]

    def forward(self, x: Tensor) -> Tensor:
        """images -> patch feature map (B, C, h, w) after the final norm."""
        tokens, (h, w), _ = self.forward_features(x)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    def _layer_index(self, i: int) -> int:
        depth = self.config.depth
        if not -depth <= i < depth:
            raise ValueError(f"layer index {i} out of range for a ViT of depth {depth}")
        return i % depth


# ---------------------------------------------------------------------------------------------------
# Presets (keyword-only, typed; any ViTConfig field can be overridden)
# ---------------------------------------------------------------------------------------------------

_TI = ViTConfig(embed_dim=192, num_heads=3)
_S = ViTConfig(embed_dim=384, num_heads=6)
_B = ViTConfig(embed_dim=768, num_heads=12)
# DINOv2 layout: patch 14, APE trained on 518 px (37 x 37 patches), LayerScale.
_DINOV2 = {"patch_size": 14, "pos_grid": 37, "layerscale": 1e-5}
# DINOv3 layout: patch 16, RoPE (no APE), 4 registers, LayerScale, LayerNorm eps 1e-5.
_DINOV3 = {"layerscale": 1e-5, "norm_eps": 1e-5}


def _build(base: ViTConfig, pos: Pos, num_register_tokens: int, drop_path: float, overrides: dict[str, Any]) -> ViT:
    try:
        cfg = replace(base, pos=pos, num_register_tokens=num_register_tokens, drop_path=drop_path, **overrides)
    except TypeError as error:  # an unknown option name
        raise UserError(f"invalid ViT option: {error}") from error
    return ViT(cfg)


def vit_ti16(*, pos: Pos = "ape", num_register_tokens: int = 0, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads (5.5 M parameters)."""
    return _build(_TI, pos, num_register_tokens, drop_path, overrides)


def vit_s16(*, pos: Pos = "ape", num_register_tokens: int = 0, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads (21.7 M parameters)."""
    return _build(_S, pos, num_register_tokens, drop_path, overrides)


def vit_b16(*, pos: Pos = "ape", num_register_tokens: int = 0, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads (86 M parameters)."""
    return _build(_B, pos, num_register_tokens, drop_path, overrides)


def vit_s14(*, pos: Pos = "ape", registers: bool = False, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """DINOv2 ViT-S/14 layout; ``registers=True`` gives the 4-register variant (antialiased APE)."""
    options = {**_DINOV2, "pos_antialias": registers, **overrides}
    return _build(_S, pos, 4 if registers else 0, drop_path, options)


def vit_b14(*, pos: Pos = "ape", registers: bool = False, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """DINOv2 ViT-B/14 layout; ``registers=True`` gives the 4-register variant (antialiased APE)."""
    options = {**_DINOV2, "pos_antialias": registers, **overrides}
    return _build(_B, pos, 4 if registers else 0, drop_path, options)


def vit_s16_dinov3(*, pos: Pos = "rope", num_register_tokens: int = 4, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """DINOv3 ViT-S/16 layout (RoPE, 4 registers, LayerScale); its weights need ``pos="rope"``."""
    return _build(_S, pos, num_register_tokens, drop_path, {**_DINOV3, **overrides})


def vit_b16_dinov3(*, pos: Pos = "rope", num_register_tokens: int = 4, drop_path: float = 0.0, **overrides: Any) -> ViT:
    """DINOv3 ViT-B/16 layout (RoPE, 4 registers, LayerScale); its weights need ``pos="rope"``."""
    return _build(_B, pos, num_register_tokens, drop_path, {**_DINOV3, **overrides})


VIT_PRESETS: dict[str, Callable[..., ViT]] = {
    "vit_ti16": vit_ti16,
    "vit_s16": vit_s16,
    "vit_b16": vit_b16,
    "vit_s14": vit_s14,
    "vit_b14": vit_b14,
    "vit_s16_dinov3": vit_s16_dinov3,
    "vit_b16_dinov3": vit_b16_dinov3,
}
