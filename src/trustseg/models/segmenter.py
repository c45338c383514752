"""ViT backbone + decode head -> logits at the input resolution."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.models.heads import FPNHead, LinearHead, MaskTransformerHead, default_fpn_layers
from trustseg.models.vit import VIT_PRESETS, Pos, ViT

HEADS = ("linear", "mask", "fpn")


class Segmenter(nn.Module):
    """``images (B, 3, H, W) -> logits (B, K, H, W)``; H and W must be multiples of ``size_divisor``."""

    def __init__(self, backbone: ViT, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.size_divisor: int = backbone.size_divisor

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(images)[0]

    def decode(self, images: Tensor, *, final_tokens: bool = False) -> tuple[Tensor, Tensor | None]:
        """(logits, and with `final_tokens` the last block's patch tokens before the final norm (B, h*w, C),
        which training objectives on the tokens read, e.g. Active Spatial Guidance)."""
        wanted = (*self.head.layers, -1) if final_tokens else self.head.layers
        tokens, grid, layers = self.backbone.forward_features(images, return_layers=wanted)
        final = layers.pop() if final_tokens else None
        # The linear head's logits are a channels-last view; upsampling from it is 3-4x slower in fp32
        # than copying the small (B, K, h, w) map first (benchmarks/RESULTS.md, "Model inference").
        logits = self.head(tokens, grid, layers).contiguous()
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False), final


def vit_segmenter(
    *,
    num_classes: int,
    backbone: str = "vit_ti16",
    head: str = "linear",
    pos: Pos | None = None,
    num_register_tokens: int | None = None,
    drop_path: float = 0.0,
    depth: int | None = None,
    pos_grid: int | None = None,
    decoder_depth: int = 2,
    fpn_channels: int = 128,
    block_heads: list[int] | None = None,
    block_mlp_hidden: list[int] | None = None,
) -> Segmenter:
    """Build a ViT segmenter from names.

    Args:
        num_classes: K, the number of output channels.
        backbone: one of ``vit_ti16``, ``vit_s16``, ``vit_b16``, ``vit_s14``, ``vit_b14`` (DINOv2
            layout), ``vit_s16_dinov3``, ``vit_b16_dinov3`` (DINOv3 layout).
        head: ``linear`` (per-patch classifier), ``mask`` (Segmenter mask transformer) or ``fpn``
            (light UPerNet on four intermediate layers).
        pos: ``ape``, ``rope`` or ``none``; default: the preset's (``rope`` for DINOv3, else ``ape``).
        num_register_tokens: register tokens of the backbone (the /14 presets accept 0 or 4); default:
            the preset's (4 for DINOv3, else 0).
        drop_path: stochastic depth rate of the backbone.
        depth: number of backbone blocks, if not the preset's 12 (e.g. a small model for quick runs).
        pos_grid: patch-grid side of the absolute position embedding, if not the preset's (14 for /16
            presets, i.e. 224 px; 37 for the DINOv2 /14 presets, i.e. 518 px).
        decoder_depth: transformer blocks of the mask head.
        fpn_channels: width of the FPN head.
        block_heads: attention heads of each backbone block, if fewer than the preset's (a structurally
            pruned backbone, see ``trustseg.compress.prune``); one int >= 1 per block.
        block_mlp_hidden: MLP hidden units of each backbone block, likewise.
    """
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    if backbone not in VIT_PRESETS:
        raise UserError(f"unknown backbone {backbone!r}; expected one of {', '.join(VIT_PRESETS)}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    # options left at None take the preset's value (e.g. RoPE and 4 registers for the DINOv3 layouts)
    given = {"depth": depth, "pos_grid": pos_grid, "pos": pos,
             "block_heads": None if block_heads is None else tuple(block_heads),
             "block_mlp_hidden": None if block_mlp_hidden is None else tuple(block_mlp_hidden)}
    backbone_options: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    if backbone.endswith("14"):
        if num_register_tokens not in (None, 0, 4):
            raise UserError(f"{backbone} (DINOv2 layout) has 0 or 4 register tokens, not {num_register_tokens}")
        backbone_options["registers"] = num_register_tokens == 4
    elif num_register_tokens is not None:
        backbone_options["num_register_tokens"] = num_register_tokens
    vit = VIT_PRESETS[backbone](drop_path=drop_path, **backbone_options)
    dim = vit.embed_dim
    decode: nn.Module
    if head == "linear":
        decode = LinearHead(dim, num_classes)
    elif head == "mask":
        decode = MaskTransformerHead(dim, num_classes, depth=decoder_depth)
    else:
        decode = FPNHead(dim, num_classes, layers=default_fpn_layers(vit.config.depth), channels=fpn_channels)
    return Segmenter(vit, decode)
