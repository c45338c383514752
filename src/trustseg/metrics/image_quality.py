"""Image-quality measures of (corrupted) images, batched in torch: which measure predicts a model's drop?

All take RGB images (B, 3, H, W) with values in [0, 255] (uint8 or float) on any device and return one
value per image (B,) float64. Where a measure needs one channel it uses the luminance
Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601).

Full reference (a corrupted image against its clean original):
- PSNR = 10 log10(255^2 / MSE) over all pixels and channels (inf for identical images).
- SSIM (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) on the luminance: Gaussian window sigma 1.5
  (11 x 11, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, the mean of
  the SSIM map over the positions where the window fits (``skimage.metrics.structural_similarity`` with
  ``gaussian_weights=True, use_sample_covariance=False`` gives the same).
No reference:
- noise: Immerkaer's fast noise variance estimation (CVIU 1996): sigma = sqrt(pi/2) / (6 (W-2)(H-2)) *
  sum |Y * N| with N = [[1,-2,1],[-2,4,-2],[1,-2,1]], the difference of two Laplacians that cancels
  image structure to first order; in grey levels.
- sharpness: the variance of the Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of Y (Pech-Pacheco et al. 2000).
- contrast: RMS contrast, the standard deviation of Y / 255 (Peli 1990).
- colourfulness (Hasler & Suesstrunk, SPIE 2003): with rg = R - G and yb = (R + G) / 2 - B,
  sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2).
Convolutions are "valid" (no padding), so borders never add made-up structure.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from trustseg.errors import UserError

PEAK = 255.0
SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03
FULL_REFERENCE = ("PSNR", "SSIM")
NO_REFERENCE = ("noise", "sharpness", "contrast", "colourfulness")
_LUMA = (0.299, 0.587, 0.114)


def _as_float(images: Tensor) -> Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"image-quality measures need RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    return images.to(torch.float64)


def luminance(images: Tensor) -> Tensor:
    """BT.601 luma (B, 1, H, W) float64 of RGB images (B, 3, H, W)."""
    weights = torch.tensor(_LUMA, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    return (_as_float(images) * weights).sum(1, keepdim=True)


def _filter(gray: Tensor, kernel: Tensor) -> Tensor:
    """Valid 2-D correlation of (B, 1, H, W) with one (h, w) kernel."""
    return F.conv2d(gray, kernel.to(gray)[None, None])


def psnr(images: Tensor, references: Tensor) -> Tensor:
    """PSNR in dB (B,) of `images` against `references` (both (B, 3, H, W) in [0, 255])."""
    error = (_as_float(images) - _as_float(references)).square().mean((1, 2, 3))
    return 10 * torch.log10(PEAK**2 / error)


def _gaussian_taps() -> Tensor:
    """The 1-D Gaussian of SSIM's window (the 2-D window is its outer product with itself)."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def ssim(images: Tensor, references: Tensor) -> Tensor:
    """Mean SSIM (B,) of the luminance of `images` against that of `references`.

    The five local statistics are filtered in one batch, by the Gaussian window as two 1-D passes
    (separable: 2 x 13 taps instead of 13 x 13, the same sums up to float64 rounding).
    """
    x, y = luminance(images), luminance(references)
    taps = _gaussian_taps().to(x)
    if min(x.shape[-2:]) < len(taps):
        raise UserError(f"SSIM needs images of at least {len(taps)} pixels a side, got {tuple(x.shape[-2:])}")
    rows = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), taps.view(1, 1, 1, -1))
    mean_x, mean_y, xx, yy, xy = F.conv2d(rows, taps.view(1, 1, -1, 1)).split(x.shape[0])
    var_x, var_y, cov = xx - mean_x**2, yy - mean_y**2, xy - mean_x * mean_y
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return index.mean((1, 2, 3))


def noise_level(images: Tensor) -> Tensor:
    """Immerkaer's estimate of the standard deviation of additive Gaussian noise (B,), in grey levels."""
    gray = luminance(images)
    height, width = gray.shape[-2:]
    if min(height, width) < 3:
        raise UserError(f"the noise estimate needs images of at least 3x3 pixels, got {height}x{width}")
    kernel = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    total = _filter(gray, kernel).abs().sum((1, 2, 3))
    return math.sqrt(math.pi / 2) * total / (6 * (width - 2) * (height - 2))


def sharpness(images: Tensor) -> Tensor:
    """Variance of the Laplacian of the luminance (B,): low for blurred images."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return _filter(luminance(images), kernel).var((1, 2, 3), unbiased=False)


def rms_contrast(images: Tensor) -> Tensor:
    """Standard deviation of the luminance scaled to [0, 1] (B,)."""
    return (luminance(images) / PEAK).std((1, 2, 3), unbiased=False)


def colourfulness(images: Tensor) -> Tensor:
    """Hasler and Suesstrunk's colourfulness (B,), in grey levels: 0 for a grey image."""
    red, green, blue = _as_float(images).unbind(1)
    rg, yb = red - green, (red + green) / 2 - blue
    spread = (rg.var((1, 2), unbiased=False) + yb.var((1, 2), unbiased=False)).sqrt()
    centre = (rg.mean((1, 2)).square() + yb.mean((1, 2)).square()).sqrt()
    return spread + 0.3 * centre


NO_REFERENCE_MEASURES = {"noise": noise_level, "sharpness": sharpness, "contrast": rms_contrast,
                         "colourfulness": colourfulness}
FULL_REFERENCE_MEASURES = {"PSNR": psnr, "SSIM": ssim}


class ImageQuality:
    """Streaming means over images of every measure: sums (float64) and counts, a few numbers whatever
    the data size. Full-reference measures count only images whose clean original has the same size;
    an identical pair has PSNR inf, so the mean PSNR of clean data is inf (null in JSON)."""

    def __init__(self) -> None:
        names = (*FULL_REFERENCE, *NO_REFERENCE)
        self.sums = dict.fromkeys(names, 0.0)
        self.counts = dict.fromkeys(names, 0)

    def update(self, images: Tensor, references: Tensor | None = None) -> None:
        """Add a batch of (corrupted) `images` (B, 3, H, W) and, optionally, their clean `references`."""
        measures: dict[str, Any] = dict(NO_REFERENCE_MEASURES)
        if references is not None and references.shape == images.shape:
            measures.update(FULL_REFERENCE_MEASURES)
        for name, measure in measures.items():
            values = measure(images, references) if name in FULL_REFERENCE_MEASURES else measure(images)
            self.sums[name] += float(values.sum())
            self.counts[name] += values.numel()

    def compute(self) -> dict[str, float]:
        """The mean of each measure (NaN when no image was measured); summed over processes under torchrun."""
        names = list(self.sums)
        totals = torch.tensor([[self.sums[n] for n in names], [float(self.counts[n]) for n in names]],
                              dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(backend_device)
            dist.all_reduce(totals)
        totals = totals.cpu()
        return {n: float(totals[0, i] / totals[1, i]) if totals[1, i] > 0 else math.nan for i, n in enumerate(names)}
