"""Paste the preserved pixels back over a regenerated image and label only what is original.

Röhrich et al. 2026 (step 3): the original pixels are pasted over the preserved region through a
Gaussian-feathered alpha mask (sigma = 1.5), and every generated pixel, the feathered boundary included,
gets the ignore label, so a synthetic image supervises only its preserved classes.

The alpha mask is the preserve mask blurred by a Gaussian truncated at radius round(3 sigma) (edge
pixels replicated outside the image). A pixel whose whole kernel window is preserved has alpha exactly
1 (set so, not left to rounding), one whose window holds no preserved pixel exactly 0. The label rule
is then: the original label where alpha == 1, the ignore label everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEATHER_SIGMA = 1.5  # Röhrich et al. 2026, paste-back alpha


def feather_radius(sigma: float) -> int:
    """Half-width of the truncated Gaussian kernel: round(3 sigma) (scipy's gaussian_filter with truncate=3)."""
    return int(3 * sigma + 0.5)


def gaussian_kernel(sigma: float) -> Tensor:
    """Normalised 1-D Gaussian weights (2r + 1,), float64."""
    radius = feather_radius(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def feather_alpha(preserve: Tensor, sigma: float = FEATHER_SIGMA) -> Tensor:
    """Alpha (H, W) float64 in [0, 1] of the original image: bool `preserve` (H, W) blurred (module doc)."""
    if sigma <= 0:
        return preserve.double()
    radius = feather_radius(sigma)
    kernel = gaussian_kernel(sigma).to(preserve.device)
    x = F.pad(preserve.double()[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    alpha = F.conv2d(x, kernel.view(1, 1, -1, 1))[0, 0].clamp_(0, 1)
    alpha[~window_any(~preserve, radius)] = 1.0
    alpha[~window_any(preserve, radius)] = 0.0
    return alpha


def window_any(mask: Tensor, radius: int) -> Tensor:
    """bool (H, W): whether the (2r + 1)^2 window around each pixel holds a True of `mask` (H, W); windows
    reaching outside the image see only its pixels (max pooling pads with -inf), as replication would."""
    size = 2 * radius + 1
    x = mask.float()[None, None]
    x = F.max_pool2d(x, (1, size), stride=1, padding=(0, radius))  # a max over a square is separable
    return F.max_pool2d(x, (size, 1), stride=1, padding=(radius, 0))[0, 0] > 0


def compose(original: Tensor, generated: Tensor, labels: Tensor, preserve: Tensor, *, ignore_index: int,
            sigma: float = FEATHER_SIGMA) -> tuple[Tensor, Tensor, Tensor]:
    """The synthetic sample from the original image uint8 (3, H, W), the generated one (same shape), the
    original labels (H, W) and the preserve mask bool (H, W): (image uint8 (3, H, W), labels (H, W),
    alpha float64 (H, W)). Pixels with alpha 1 are the original ones, bit for bit."""
    if original.shape != generated.shape or original.shape[-2:] != labels.shape or labels.shape != preserve.shape:
        raise ValueError(f"shapes differ: image {tuple(original.shape)}, generated {tuple(generated.shape)}, "
                         f"labels {tuple(labels.shape)}, preserve {tuple(preserve.shape)}")
    alpha = feather_alpha(preserve.bool(), sigma)
    blended = alpha * original.double() + (1 - alpha) * generated.double()
    image = blended.round_().clamp_(0, 255).to(torch.uint8)
    kept = alpha == 1.0
    new_labels = torch.where(kept, labels, torch.full_like(labels, ignore_index))
    return image, new_labels, alpha

