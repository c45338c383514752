"""U-Net (Ronneberger et al., MICCAI 2015): the convolutional baseline.

Encoder: a stem of two 3x3 conv-norm-ReLU layers, then ``depth`` times (2x2 max-pool, two conv layers)
with the width doubling at each level. Decoder: per level, upsample by 2, concatenate the encoder
feature of the same resolution (the skip), two conv layers. A 1x1 conv gives the logits at input size.

Two choices differ from the 2015 paper, both for speed on CPU and neither changes the architecture's
character: convolutions are padded ("same"), so the output is at input size without cropping; and the
upsampling path first halves the channels at the *low* resolution (a 1x1 conv before bilinear
upsampling, or a 2x2 transposed conv) so that the concatenation is ``2 * width`` channels instead of
``3 * width``, which would cost 1.5x the FLOPs in the first conv of each decoder level.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.models.shapes import check_input_size

Norm = Literal["batch", "group"]
Upsample = Literal["bilinear", "transpose"]


def _group_count(channels: int) -> int:
    # GroupNorm's customary 32 groups, but keep at least 4 channels per group so that narrow layers
    # (base_width 16) do not degenerate into instance norm.
    for groups in range(min(32, channels // 4), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(_group_count(channels), channels)


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, norm, ReLU) layers; the conv has no bias because the norm that follows adds one."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample ``x`` by 2 to ``out_channels``, concatenate the skip, then a :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int, norm: Norm, upsample: Upsample) -> None:
        super().__init__()
        self.upsample = upsample
        if upsample == "transpose":
            self.reduce: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        else:
            self.reduce = nn.Conv2d(in_channels, out_channels, 1)
        self.conv = DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.reduce(x)
        if self.upsample == "bilinear":
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net mapping images (B, C_in, H, W) to logits (B, K, H, W); H and W must divide by ``2**depth``."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        base_width: int = 32,
        depth: int = 4,
        norm: Norm = "batch",
        upsample: Upsample = "bilinear",
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or base_width < 1 or depth < 1:
            raise UserError(
                f"UNet: num_classes, in_channels, base_width and depth must be >= 1, got "
                f"{num_classes}, {in_channels}, {base_width}, {depth}"
            )
        if norm not in ("batch", "group"):
            raise UserError(f"UNet: norm must be 'batch' or 'group', got {norm!r}")
        if upsample not in ("bilinear", "transpose"):
            raise UserError(f"UNet: upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        self.num_classes = num_classes
        self.size_divisor = 2**depth
        widths = [base_width * 2**level for level in range(depth + 1)]
        self.stem = DoubleConv(in_channels, widths[0], norm)
        self.down = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm) for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], norm, upsample) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward_features(self, images: Tensor) -> Tensor:
        """Decoder feature map (B, base_width, H, W) before the classifier."""
        check_input_size(*images.shape[-2:], self.size_divisor, model=f"UNet(depth={len(self.down)})")
        x = self.stem(images)
        skips = []
        for down in self.down:
            skips.append(x)
            x = down(F.max_pool2d(x, 2))
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return x

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.forward_features(images))


def unet(
    *,
    num_classes: int,
    in_channels: int = 3,
    base_width: int = 32,
    depth: int = 4,
    norm: Norm = "batch",
    upsample: Upsample = "bilinear",
) -> UNet:
    """U-Net with ``base_width * 2**depth`` channels at the bottleneck (7.2 M parameters at the defaults)."""
    return UNet(
        num_classes, in_channels=in_channels, base_width=base_width, depth=depth, norm=norm, upsample=upsample
    )
