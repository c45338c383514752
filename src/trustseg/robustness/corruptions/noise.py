"""Noise corruptions: Gaussian, shot (Poisson), impulse (salt and pepper) and speckle, per channel and pixel.

Severity constants are those of Hendrycks & Dietterich (ICLR 2019) as shipped in the ``imagecorruptions``
package; the noise is drawn independently for every channel of every pixel, as the reference does on an
(H, W, 3) array. Each image's noise comes from its own generator (see ``ops.per_image``), drawn on the
CPU and moved to the images' device.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from trustseg.robustness.corruptions import ops
from trustseg.robustness.corruptions.ops import Generators

GAUSSIAN_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
# Photons per unit intensity: smaller means fewer photons, so relatively noisier.
SHOT_RATE = (60, 25, 12, 5, 3)
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_STD = (0.15, 0.2, 0.35, 0.45, 0.6)

# Inputs quantised to 8 bits (every ``corrupt`` input is) take one of 256 intensities, so shot noise can be
# sampled by inversion from 256 precomputed Poisson CDFs, about 7x faster than ``torch.poisson``.
_LEVELS = 256
# Guide-table buckets per level: u in bucket t starts its search at the quantile of t / _BUCKETS, so most
# samples need one table look-up and one comparison.
_BUCKET_BITS = 10
_BUCKETS = 1 << _BUCKET_BITS


def _normal(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    """Standard normal noise (B, ...) on ``device``, each image's from its own generator."""
    out = torch.empty(shape)
    for image, g in zip(out, ops.per_image(generator, shape[0])):
        image.normal_(generator=g)
    return out.to(device)


@ops.image_by_image
def gaussian_noise(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Additive white Gaussian noise of std 0.08-0.38 (images (B, 3, H, W) in [0, 1])."""
    noise = _normal(images.shape, generator, images.device)
    return torch.add(images, noise, alpha=GAUSSIAN_STD[severity - 1], out=noise).clamp_(0, 1)


@ops.image_by_image
def speckle_noise(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Multiplicative Gaussian noise ``x + x * n``, n of std 0.15-0.6."""
    noise = _normal(images.shape, generator, images.device)
    return torch.addcmul(images, images, noise, value=SPECKLE_STD[severity - 1], out=noise).clamp_(0, 1)


@ops.image_by_image
def impulse_noise(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Salt and pepper: a fraction 0.03-0.27 of the values become 0 or 1 with equal odds.

    ``skimage.util.random_noise(mode='s&p')`` flips every *element* (each channel of each pixel) on its
    own with probability ``amount`` and picks salt with probability 0.5; one uniform u per element gives
    the same joint law (pepper for u < amount / 2, salt for amount / 2 <= u < amount) at half the draws.
    """
    flip = round(IMPULSE_AMOUNT[severity - 1] * 2 ** 31)
    bits = ops.random_bits(images.shape, generator, images.device)
    # Clamp x to [low, high]: [0, 0] for pepper, [1, 1] for salt, [0, 1] (x unchanged) otherwise; twice
    # as fast as masked_fill, whose masked writes do not vectorise on CPU.
    high = torch.ge(bits, flip // 2, out=torch.empty_like(images))
    low = torch.ge(bits, flip, out=torch.empty_like(images)).neg_().add_(high)
    return torch.clamp(images, low, high, out=low)


@lru_cache(maxsize=2 * len(SHOT_RATE))
def _shot_tables(rate: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse-CDF tables of Poisson(rate * level / 255), counts saturated at ``rate``.

    The output is ``min(count, rate) / rate`` (the reference clips at 1), so counts above ``rate`` need not
    be told apart: each level's CDF has entries for 0..rate-1 and a final 1.0 for ">= rate". Returns, over
    flat entries ``level * (rate + 1) + k``, ``cdf`` float64 and ``value`` = k / rate float32, and
    ``guide`` (levels * _BUCKETS,) int32: for bucket [t, t + 1) / _BUCKETS the entry of the smallest
    count reachable from it, stored as ``-(entry + 1)`` when a CDF step falls inside the bucket (those
    samples must compare u with the CDF; the others are decided by their bucket alone). Computed on the
    CPU (the same table for every device) and kept on ``device``.
    """
    lam = rate * torch.arange(_LEVELS, dtype=torch.float64)[:, None] / (_LEVELS - 1)
    k = torch.arange(rate, dtype=torch.float64)
    # xlogy gives 0 * log 0 = 0, so level 0 (rate 0) puts all its mass on k = 0.
    pmf = torch.exp(torch.special.xlogy(k, lam) - lam - torch.lgamma(k + 1))
    cdf = torch.cat([pmf.cumsum(1), torch.ones(_LEVELS, 1, dtype=torch.float64)], 1)
    starts = (torch.arange(_BUCKETS, dtype=torch.float64) / _BUCKETS).expand(_LEVELS, -1).contiguous()
    first = torch.searchsorted(cdf, starts, right=True)
    stepped = torch.gather(cdf, 1, first) < starts + 1 / _BUCKETS
    entry = first + torch.arange(_LEVELS)[:, None] * (rate + 1)
    guide = torch.where(stepped, -(entry + 1), entry).int()
    value = (torch.arange(rate + 1, dtype=torch.float32) / rate).repeat(_LEVELS)
    return cdf.flatten().to(device), value.to(device), guide.flatten().to(device)


def _shot_noise_quantised(levels: Tensor, bits: Tensor, rate: int) -> Tensor:
    """Poisson(rate * levels / 255) / rate clipped to 1, by inversion; levels float 0..255 and
    ``random_bits`` (u = bits / 2^31, resolving probabilities to 5e-10), all (N,)."""
    cdf, value, guide = _shot_tables(rate, levels.device)
    bucket = (bits >> (31 - _BUCKET_BITS)).add_(levels.int().mul_(_BUCKETS))
    entry = guide.index_select(0, bucket)
    todo = (entry < 0).nonzero().squeeze(1)
    if todo.numel():
        # The count is the number of CDF entries <= u: step past the ones below u inside the bucket.
        u = bits[todo].double() / 2 ** 31
        entry[todo] = -entry[todo] - 1
        behind = (cdf[entry[todo]] <= u).nonzero().squeeze(1)
        while behind.numel():
            entry[todo[behind]] += 1
            behind = behind[cdf[entry[todo[behind]]] <= u[behind]]
    return value.index_select(0, entry)


@ops.image_by_image
def shot_noise(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Poisson photon noise: ``Poisson(rate * x) / rate`` clipped to [0, 1], rate 60 down to 3.

    Exact for any input; 8-bit-quantised images take a fast inversion path (``_shot_tables``), others
    ``torch.poisson``, which runs on the CPU (its generator's device) and is moved back.
    """
    rate = SHOT_RATE[severity - 1]
    scaled = images.reshape(-1) * (_LEVELS - 1)
    levels = scaled.round()
    # 1e-3 of a grey level is far above float32 rounding of k / 255 yet far below any real intensity step.
    if scaled.sub_(levels).abs_().amax() < 1e-3:
        bits = ops.random_bits((images.shape[0], levels.numel() // images.shape[0]), generator, images.device)
        return _shot_noise_quantised(levels, bits.view(-1), rate).view(images.shape)
    generators = ops.per_image(generator, images.shape[0])
    counts = torch.stack([torch.poisson(image.cpu() * rate, generator=g) for image, g in zip(images, generators)])
    return counts.to(images.device).div_(rate).clamp_(max=1)


__all__ = ["gaussian_noise", "impulse_noise", "shot_noise", "speckle_noise"]
