"""SegFormer (Xie et al., NeurIPS 2021): Mix Transformer (MiT) encoder + all-MLP decoder.

Encoder, four stages at strides 4, 8, 16, 32 of the input. Each stage: an overlapping patch embedding
(strided conv with kernel > stride, then LayerNorm), blocks of efficient self-attention (keys and
values come from a map shrunk by a strided conv of ratio ``sr``, so attention costs N * N / sr**2) and
Mix-FFN (Linear, 3x3 depthwise conv, GELU, Linear; the depthwise conv is what gives the model its
sense of position, there are no positional embeddings), and a final LayerNorm.
Decoder: a Linear per stage to ``decoder_dim`` channels, bilinear upsampling to the stride-4 grid,
concatenation (deepest stage first), a 1x1 conv + BatchNorm + ReLU fuse, dropout, a 1x1 classifier.

Tokens are kept as (B, N, C) with N = H * W in row-major order; a token sequence viewed as a map
``(B, C, H, W)`` is then channels-last in memory, so the convolutions inside the encoder (depthwise,
spatial reduction, patch embedding) run channels-last without copies.

``load_segformer_weights`` loads Hugging Face ``transformers`` checkpoints (whole model or encoder only).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.models.shapes import check_input_size
from trustseg.models.weights import LoadReport, as_state_dict, load_mapped


@dataclass(frozen=True)
class MiTConfig:
    """Per-stage sizes of a Mix Transformer; the tuples have one entry per stage."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4


# The paper's MiT-B0..B5 (appendix, detailed settings) and their decoder widths (256 for B0/B1, else 768).
PRESETS: dict[str, tuple[MiTConfig, int]] = {
    "b0": (MiTConfig(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2)), 256),
    "b1": (MiTConfig(widths=(64, 128, 320, 512), depths=(2, 2, 2, 2)), 256),
    "b2": (MiTConfig(widths=(64, 128, 320, 512), depths=(3, 4, 6, 3)), 768),
    "b3": (MiTConfig(widths=(64, 128, 320, 512), depths=(3, 4, 18, 3)), 768),
    "b4": (MiTConfig(widths=(64, 128, 320, 512), depths=(3, 8, 27, 3)), 768),
    "b5": (MiTConfig(widths=(64, 128, 320, 512), depths=(3, 6, 40, 3)), 768),
}


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a channels-last view (no copy)."""
    return tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def map_to_tokens(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C); free for channels-last maps."""
    return feature_map.permute(0, 2, 3, 1).flatten(1, 2)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero the residual branch of whole samples with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * keep / (1 - p)


# Layer norms use PyTorch's default eps 1e-5, as Hugging Face's SegFormer does, because its checkpoints
# are what we load (the original code used 1e-6 inside the blocks: negligible at unit-order variances).


class OverlapPatchEmbed(nn.Module):
    """Strided conv with kernel > stride (neighbouring patches overlap), then LayerNorm over channels."""

    def __init__(self, in_channels: int, width: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(width)

    def forward(self, feature_map: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(feature_map)
        height, width = x.shape[-2:]
        return self.norm(map_to_tokens(x)), height, width


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced by a ``sr`` x ``sr`` strided conv."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, attn_dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise UserError(f"MiT: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.sr: nn.Module | None = None
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        context = x
        if self.sr is not None:
            context = self.sr_norm(map_to_tokens(self.sr(tokens_to_map(x, height, width))))
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, d)
        k = self.k(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        v = self.v(context).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        dropout = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.out(out.transpose(1, 2).flatten(2))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = map_to_tokens(self.dwconv(tokens_to_map(self.fc1(x), height, width)))
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mix_ffn(norm2(x)), with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x), height, width), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), height, width), self.drop_path, self.training)


class Stage(nn.Module):
    """Patch embedding, blocks, LayerNorm: map (B, C_in, H, W) -> map (B, C, H / stride, W / stride)."""

    def __init__(self, in_channels: int, cfg: MiTConfig, index: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        width = cfg.widths[index]
        self.patch_embed = OverlapPatchEmbed(in_channels, width, cfg.patch_sizes[index], cfg.strides[index])
        self.blocks = nn.ModuleList(
            Block(width, cfg.num_heads[index], cfg.sr_ratios[index], cfg.mlp_ratio, p) for p in drop_paths
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, feature_map: Tensor) -> Tensor:
        x, height, width = self.patch_embed(feature_map)
        for block in self.blocks:
            x = block(x, height, width)
        return tokens_to_map(self.norm(x), height, width)


class MiT(nn.Module):
    """Mix Transformer encoder: images (B, C_in, H, W) -> one map (B, C_i, H / s_i, W / s_i) per stage."""

    def __init__(self, cfg: MiTConfig, *, in_channels: int = 3, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        per_stage = (cfg.widths, cfg.depths, cfg.num_heads, cfg.sr_ratios, cfg.patch_sizes, cfg.strides)
        if len({len(t) for t in per_stage}) != 1:
            raise UserError(f"MiTConfig: per-stage tuples differ in length: {cfg}")
        self.cfg = cfg
        total = sum(cfg.depths)
        # Stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last.
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        channels = (in_channels, *cfg.widths[:-1])
        self.stages = nn.ModuleList()
        for index, depth in enumerate(cfg.depths):
            self.stages.append(Stage(channels[index], cfg, index, rates[:depth]))
            rates = rates[depth:]

    def forward(self, images: Tensor) -> list[Tensor]:
        features = []
        x = images
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class AllMLPDecoder(nn.Module):
    """Stage maps -> logits (B, K, H / s_0, W / s_0) on the grid of the first (stride-4) stage."""

    def __init__(self, in_widths: Sequence[int], num_classes: int, *, dim: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(width, dim) for width in in_widths)
        self.fuse = nn.Conv2d(len(in_widths) * dim, dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        # Whole-channel dropout, as in mmsegmentation's decode heads that produced the paper's numbers.
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        projected = []
        # Projecting before upsampling is exact (both are linear) and 4**i times cheaper for stage i.
        for feature, proj in zip(features, self.proj):
            x = proj(feature.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        # Deepest stage first: the channel order the original code (and its checkpoints) use.
        x = F.relu(self.bn(self.fuse(torch.cat(projected[::-1], dim=1))))
        return self.classifier(self.dropout(x))


class SegFormer(nn.Module):
    """SegFormer: images (B, C_in, H, W) -> logits (B, K, H, W); H and W must divide by 32."""

    def __init__(
        self,
        num_classes: int,
        cfg: MiTConfig,
        *,
        in_channels: int = 3,
        decoder_dim: int = 256,
        drop_path_rate: float = 0.1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise UserError(f"SegFormer: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.size_divisor = math.prod(cfg.strides)
        self.encoder = MiT(cfg, in_channels=in_channels, drop_path_rate=drop_path_rate)
        self.decoder = AllMLPDecoder(cfg.widths, num_classes, dim=decoder_dim, dropout=dropout)
        self.apply(_init_weights)
        # Decode heads start near-uniform (normal std 0.01 in mmsegmentation's BaseDecodeHead): He-normal
        # over only K output channels gives logits of std ~5 and an initial loss ~3x ln K.
        nn.init.normal_(self.decoder.classifier.weight, std=0.01)

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """Encoder maps, one per stage: (B, C_i, H / s_i, W / s_i)."""
        check_input_size(*images.shape[-2:], self.size_divisor, model="SegFormer")
        return self.encoder(images)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.decoder(self.forward_features(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def _init_weights(module: nn.Module) -> None:
    # The original recipe: truncated normal (std 0.02) for Linear, He-normal by fan-out for convs.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def segformer(
    *,
    num_classes: int,
    variant: str = "b0",
    in_channels: int = 3,
    decoder_dim: int | None = None,
    drop_path_rate: float = 0.1,
    dropout: float = 0.1,
) -> SegFormer:
    """SegFormer-B0..B5; ``decoder_dim`` defaults to the paper's (256 for b0/b1, 768 otherwise)."""
    if variant not in PRESETS:
        raise UserError(f"unknown SegFormer variant {variant!r}; expected one of {', '.join(PRESETS)}")
    cfg, default_dim = PRESETS[variant]
    return SegFormer(
        num_classes,
        cfg,
        in_channels=in_channels,
        decoder_dim=decoder_dim or default_dim,
        drop_path_rate=drop_path_rate,
        dropout=dropout,
    )


# ---------------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ---------------------------------------------------------------------------------------------------

# Two spellings of the same weights: the hub layout (every checkpoint file on the hub, and the state
# dict of transformers < 5) and the layout transformers >= 5 uses in memory (it renames the hub layout
# on load). Anchored at the start of the key, after an optional "segformer." prefix.
_OUTER_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"encoder\.patch_embeddings\.(\d+)\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
        (r"encoder\.patch_embeddings\.(\d+)\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
        (r"encoder\.block\.(\d+)\.(\d+)\.", r"encoder.stages.\1.blocks.\2."),
        (r"encoder\.layer_norm\.(\d+)\.", r"encoder.stages.\1.norm."),
        (r"stages\.(\d+)\.patch_embeddings\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
        (r"stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
        (r"stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.blocks.\2."),
        (r"stages\.(\d+)\.layer_norm\.", r"encoder.stages.\1.norm."),
        (r"decode_head\.linear_c\.(\d+)\.proj\.", r"decoder.proj.\1."),
        (r"decode_head\.linear_projections\.(\d+)\.proj\.", r"decoder.proj.\1."),
        (r"decode_head\.linear_fuse\.", "decoder.fuse."),
        (r"decode_head\.batch_norm\.", "decoder.bn."),
        (r"decode_head\.classifier\.", "decoder.classifier."),
    )
)

# Inside one transformer block: hub name, transformers >= 5 name -> ours.
_BLOCK_RULES: dict[str, str] = {
    "layer_norm_1.": "norm1.",
    "layernorm_before.": "norm1.",
    "attention.self.query.": "attn.q.",
    "attention.q_proj.": "attn.q.",
    "attention.self.key.": "attn.k.",
    "attention.k_proj.": "attn.k.",
    "attention.self.value.": "attn.v.",
    "attention.v_proj.": "attn.v.",
    "attention.output.dense.": "attn.out.",
    "attention.o_proj.": "attn.out.",
    "attention.self.sr.": "attn.sr.",
    "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
    "attention.self.layer_norm.": "attn.sr_norm.",
    "attention.sequence_reduction.layer_norm.": "attn.sr_norm.",
    "layer_norm_2.": "norm2.",
    "layernorm_after.": "norm2.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.",
    "mlp.dense2.": "mlp.fc2.",
    "mlp.fc2.": "mlp.fc2.",
}


def hf_segformer_key(key: str) -> str | None:
    """Our :class:`SegFormer` key for a Hugging Face SegFormer key.

    ``None`` for the ImageNet classifier of ``mit-bX`` checkpoints (``classifier.*``), which has no
    counterpart; an unrecognised key is returned unchanged so that a strict load reports it.
    """
    inner = key.removeprefix("segformer.")
    if inner.startswith("classifier."):
        return None
    for pattern, replacement in _OUTER_RULES:
        match = pattern.match(inner)
        if match is None:
            continue
        head, rest = match.expand(replacement), inner[match.end() :]
        if ".blocks." not in head:
            return head + rest
        for theirs, ours in _BLOCK_RULES.items():
            if rest.startswith(theirs):
                return head + ours + rest[len(theirs) :]
        return key
    return key


def load_segformer_weights(
    model: SegFormer,
    path_or_state: str | Path | Mapping[str, Tensor],
    *,
    encoder_only: bool = False,
    reinitialise: Collection[str] = (),
    source: str | None = None,
) -> LoadReport:
    """Load a Hugging Face SegFormer checkpoint (file or state dict) into ``model``, strictly.

    Accepts ``SegformerForSemanticSegmentation`` checkpoints (encoder + decode head) and encoder-only
    ones: ``SegformerModel`` (keys without a prefix) and the ImageNet-pretrained ``mit-bX``
    (``segformer.`` prefix, plus a ``classifier`` that is dropped). Both the hub key layout and the
    one of ``transformers`` >= 5 are understood. With an encoder-only checkpoint, or with
    ``encoder_only=True`` (e.g. to fine-tune an ADE20K model on other classes), only the encoder is
    loaded and the decoder keeps its initialisation.

    ``reinitialise`` names our keys that keep their initialisation when the checkpoint's tensor has
    another shape (pass the classifier's keys to fine-tune a whole model on another number of classes).
    ``source`` names what is loaded in messages (default: the path).

    Returns what was not loaded: ``missing`` lists our keys left as initialised (the decoder's, for
    an encoder-only load), ``dropped`` the checkpoint keys that were ignored, ``reinitialised`` the
    skipped classifier keys. Any other mismatch (a missing or extra encoder key, a wrong variant, a
    different class count without ``reinitialise``) raises ``UserError``.
    """
    is_path = isinstance(path_or_state, (str, Path))
    source = source or (f"SegFormer checkpoint {path_or_state}" if is_path else "SegFormer state dict")
    state = as_state_dict(path_or_state, source=source)
    has_head = any(key.removeprefix("segformer.").startswith("decode_head.") for key in state)
    if has_head and not encoder_only:
        return load_mapped(model, state, hf_segformer_key, source=source, reinitialise=reinitialise)

    def encoder_key(key: str) -> str | None:
        ours = hf_segformer_key(key)
        if ours is None or ours.startswith("decoder."):
            return None
        return ours.removeprefix("encoder.")

    report = load_mapped(model.encoder, state, encoder_key, source=source)
    left_as_initialised = [f"decoder.{key}" for key in model.decoder.state_dict()]
    return LoadReport(missing=left_as_initialised, unexpected=[], dropped=report.dropped)
