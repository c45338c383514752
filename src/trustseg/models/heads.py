"""Decode heads for ViT patch tokens.

Every head has the same interface::

    head.layers: tuple[int, ...]       # backbone blocks whose outputs it needs (may be empty)
    head(tokens (B, N, C), grid (h, w), layers: list of (B, N, C)) -> logits (B, K, h', w')

``tokens`` are the backbone's patch tokens after its final norm, ``layers`` the raw outputs of the
blocks in ``head.layers``; ``Segmenter`` upsamples the logits to the input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.models.vit import Block, ViTConfig


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class LinearHead(nn.Module):
    """Segmenter's linear decoder (Strudel et al. 2021): a per-patch linear classifier."""

    layers: tuple[int, ...] = ()

    def __init__(self, embed_dim: int, num_classes: int, *, norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        self.proj = nn.Linear(embed_dim, num_classes)

    def forward(self, tokens: Tensor, grid: tuple[int, int], layers: Sequence[Tensor] = ()) -> Tensor:
        return tokens_to_map(self.proj(self.norm(tokens)), grid)


class MaskTransformerHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021).

    K learnable class embeddings are appended to the projected patch tokens and processed jointly by
    a few transformer blocks; masks are scalar products of L2-normalised patch and class features,
    followed by a LayerNorm over the K class scores ("mask norm").
    """

    layers: tuple[int, ...] = ()

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        *,
        dim: int | None = None,
        depth: int = 2,
        num_heads: int | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        dim = dim or embed_dim  # Segmenter: decoder width = encoder width, 64-dim heads
        num_heads = num_heads or max(dim // 64, 1)
        self.num_classes = num_classes
        self.proj_in = nn.Linear(embed_dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        cfg = ViTConfig(embed_dim=dim, depth=depth, num_heads=num_heads, pos="none", cls_token=False)
        self.blocks = nn.ModuleList(Block(cfg, drop_path * i / max(depth - 1, 1)) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor, grid: tuple[int, int], layers: Sequence[Tensor] = ()) -> Tensor:
        x = self.proj_in(tokens)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        n = tokens.shape[1]
        patches = F.normalize(self.proj_patch(x[:, :n]), dim=-1)
        classes = F.normalize(self.proj_classes(x[:, n:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return tokens_to_map(masks, grid)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: segmentation batches on CPU are small
    return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels)  # >= 2 channels per group


def _conv_norm_act(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), _norm(cout), nn.ReLU(inplace=True))


class FPNHead(nn.Module):
    """A light UPerNet/FPN decoder on four intermediate ViT layers (no pyramid pooling module).

    The four token maps (stride = patch size) are rescaled to relative strides 1/4, 1/2, 1, 2 of the
    patch size (two deconvs, one deconv, identity, max-pool; as ViTDet/BEiT do), projected to
    ``channels`` by 1x1 laterals, fused top-down, smoothed by 3x3 convs, upsampled to the finest level,
    concatenated and classified. Output stride: patch_size / 4.
    """

    def __init__(self, embed_dim: int, num_classes: int, *, layers: Sequence[int], channels: int = 128) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"FPNHead needs 4 backbone layers, got {tuple(layers)}")
        self.layers = tuple(layers)
        c = embed_dim
        self.in_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(4))
        self.rescale = nn.ModuleList(
            [
                nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2), _norm(c), nn.GELU(), nn.ConvTranspose2d(c, c, 2, stride=2)),
                nn.ConvTranspose2d(c, c, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        )
        self.laterals = nn.ModuleList(_conv_norm_act(c, channels, 1) for _ in range(4))
        self.smooth = nn.ModuleList(_conv_norm_act(channels, channels, 3) for _ in range(4))
        self.fuse = _conv_norm_act(4 * channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], layers: Sequence[Tensor] = ()) -> Tensor:
        if len(layers) != 4:
            raise ValueError(f"FPNHead expects the outputs of blocks {self.layers}, got {len(layers)} tensors")
        maps = [
            lateral(rescale(tokens_to_map(norm(t), grid)))
            for t, norm, rescale, lateral in zip(layers, self.in_norms, self.rescale, self.laterals)
        ]
        for i in range(3, 0, -1):  # top-down: coarse to fine
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        size = maps[0].shape[-2:]
        outs = [smooth(m) for smooth, m in zip(self.smooth, maps)]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


def default_fpn_layers(depth: int) -> tuple[int, int, int, int]:
    """Four evenly spaced block indices ending at the last block: (2, 5, 8, 11) for depth 12."""
    return tuple(max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4))  # type: ignore[return-value]
