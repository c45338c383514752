"""The model's own features as a refinement guide (the "foundation-model prior" of uncertainty-guided
test-time optimisation, UTTO, with the segmenter standing in for the foundation model).

The features are the input of the model's classifier, the last layer that maps a per-pixel (or per-patch)
feature vector to the K class scores: a 1x1 convolution (U-Net, SegFormer, FPN heads) or a linear layer on
patch tokens (the linear ViT head). The mask transformer head has no such layer and is refused.

`FeatureTap` runs the model and returns its logits with the features appended as extra channels, at the
logits' resolution, so padding, sliding windows and resizing treat both alike. The features are first
projected onto `channels` fixed random directions (Gaussian, seed 0): the guide's affinity averages
per-channel differences, which a random projection preserves up to a small distortion (Johnson and
Lindenstrauss), and the memory at full resolution stays `channels` maps whatever the feature width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError

GUIDE_CHANNELS = 8


def classifier_layer(model: nn.Module, num_classes: int) -> nn.Module:
    """The last 1x1 convolution or linear layer of `model` with `num_classes` outputs."""
    layers = [m for m in model.modules()
              if (isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1))
              or (isinstance(m, nn.Linear) and m.out_features == num_classes)]
    if not layers:
        raise UserError(f"--refine-guide features: {type(model).__name__} has no 1x1 convolution or linear layer with "
                        f"{num_classes} outputs whose input could serve as features; use --refine-guide image")
    return layers[-1]


def feature_map(captured: Tensor, image_size: tuple[int, int]) -> Tensor:
    """A classifier input as (B, D, h, w): maps pass through; patch tokens (B, N, D) are laid out on the
    grid of the padded input's aspect ratio."""
    if captured.ndim == 4:
        return captured
    batch, count, width = captured.shape
    rows = round(math.sqrt(count * image_size[0] / image_size[1]))
    if rows < 1 or count % rows:
        raise UserError(f"--refine-guide features: {count} classifier tokens do not form a grid of the input's aspect "
                        f"{image_size[0]}x{image_size[1]}")
    return captured.transpose(1, 2).reshape(batch, width, rows, count // rows)


class FeatureTap:
    """images (B, 3, H, W) -> (B, K + c, H', W'): the model's logits, then its classifier input projected
    to c = min(channels, D) channels and resized bilinearly to the logits' size. A plain callable, not a
    module, so the model it wraps is not registered twice in its predictor."""

    def __init__(self, model: nn.Module, num_classes: int, channels: int = GUIDE_CHANNELS) -> None:
        self.model, self.num_classes, self.channels = model, num_classes, channels
        self.layer = classifier_layer(model, num_classes)
        self.directions: Tensor | None = None  # (D, channels), drawn at the first call that needs it

    def projection(self, width: int, like: Tensor) -> Tensor | None:
        if width <= self.channels:
            return None
        if self.directions is None or self.directions.shape[0] != width:
            self.directions = torch.randn(width, self.channels, generator=torch.Generator().manual_seed(0))
        return self.directions.to(like.device, like.dtype)

    def __call__(self, images: Tensor) -> Tensor:
        captured: list[Tensor] = []
        hook = self.layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(images)
        finally:
            hook.remove()
        features = feature_map(captured[-1], tuple(images.shape[-2:])).float()
        projection = self.projection(features.shape[1], features)
        if projection is not None:
            features = torch.einsum("bdhw,dc->bchw", features, projection)
        features = F.interpolate(features, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([logits.float(), features], dim=1)
