"""Digital corruptions: brightness, contrast, saturate, pixelate, JPEG compression and elastic transform.

Constants and behaviour follow Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019, as packaged by ``imagecorruptions`` (Michaelis et al. 2019,
fork ``imagecorruptions-imaug`` 1.1.5), which is the oracle of the tests. That package works image by image
in NumPy / scikit-image / Pillow; here each corruption is re-derived from its formula as a batched torch
function on float (B, 3, H, W) in [0, 1]:

- brightness and saturate change one HSV component (scikit-image's rgb2hsv/hsv2rgb). With hue fixed, every
  channel keeps its place between min and max, so the round trip through HSV reduces to a per-pixel
  rescaling of RGB, with no hue arithmetic.
- pixelate and jpeg_compression are defined on 8-bit levels, so they are uint8 -> uint8 functions
  (``pixelate_uint8``, ``jpeg_compression_uint8``, which ``corrupt`` calls directly) with float wrappers.
  pixelate makes the reference's own two Pillow resizes on the CPU, and Pillow's fixed-point arithmetic
  in torch on other devices (the same levels); JPEG coding uses libjpeg-turbo through OpenCV, which
  gives the bytes and pixels of Pillow's ``save(quality=q)`` (same quantisation tables, 4:2:0 chroma
  subsampling, ISLOW DCT), on the CPU for every device.
- elastic_transform draws a smooth random displacement field and resamples bilinearly with scipy's
  ``map_coordinates(order=1, mode='reflect')`` boundary rule; ``elastic_field`` and ``warp`` are exposed so
  that label maps can be moved with the same field.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from trustseg.robustness.corruptions import ops
from trustseg.robustness.corruptions.ops import Generators

# Per-severity constants of imagecorruptions (Hendrycks & Dietterich, ICLR 2019).
BRIGHTNESS_SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)  # added to HSV value
CONTRAST_FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)  # deviation from the channel mean is scaled by this
SATURATE = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2))  # S -> S * a + b
PIXELATE_RATIO = (0.6, 0.5, 0.4, 0.3, 0.25)  # downscale factor before the nearest upscale
JPEG_QUALITY = (25, 18, 15, 10, 7)
# Pillow's 8-bit resampling coefficients are fixed point with this many fraction bits (Resample.c:
# PRECISION_BITS = 32 - 8 - 2).
PILLOW_PRECISION_BITS = 22
ELASTIC_ALPHA = tuple(250 * f for f in (0.05, 0.065, 0.085, 0.1, 0.12))  # gain on the smoothed noise
ELASTIC_SIGMA = 0.01  # Gaussian sigma as a fraction of (H, W)
ELASTIC_NOISE = 0.005  # noise amplitude as a fraction of H (for dy and dx alike, as in the reference)
ELASTIC_TRUNCATE = 3.0  # the reference smooths with skimage gaussian(..., truncate=3)


def brightness(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Add ``c`` to HSV value (clipped to 1): hsv2rgb(h, s, v') = rgb * v' / v; black becomes grey v'."""
    shift = BRIGHTNESS_SHIFT[severity - 1]
    value = _channel_max(images)
    lifted = (value + shift).clamp_(max=1.0)
    # rgb / v (not v' / v) keeps the max channel at exactly v', as hsv2rgb returns it.
    ratio = torch.where(value > 0, images / value, 1.0)
    return ratio.mul_(lifted).clamp_(0.0, 1.0)


def contrast(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Pull every pixel towards its image's per-channel spatial mean: (x - m) * c + m."""
    factor = CONTRAST_FACTOR[severity - 1]
    means = images.mean(dim=(-2, -1), keepdim=True)
    return torch.add(means * (1 - factor), images, alpha=factor).clamp_(0.0, 1.0)


def saturate(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Map HSV saturation S -> clip(S * a + b, 0, 1) at fixed hue and value.

    A channel sits at v * (1 - w * S) with w = (v - x) / (v - min) in [0, 1] set by the hue, so the new
    image is v * (1 - w * S'). Grey pixels have hue 0 in scikit-image, i.e. w = (0, 1, 1): a positive
    offset ``b`` (severities 4-5) tints them red, as the reference does.
    """
    gain, offset = SATURATE[severity - 1]
    value = _channel_max(images)
    spread = value - _channel_min(images)
    sat = torch.where(value > 0, spread / value, 0.0)
    new_sat = sat.mul_(gain).add_(offset).clamp_(0.0, 1.0)
    grey = torch.tensor([0.0, 1.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    weight = torch.where(spread > 0, (value - images) / spread, grey)
    return weight.mul_(new_sat).neg_().add_(1.0).mul_(value).clamp_(0.0, 1.0)


def pixelate(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """``pixelate_uint8`` on float images: read as the 8-bit levels Pillow would see, returned as levels / 255."""
    return _on_levels(pixelate_uint8, images, severity, generator)


def jpeg_compression(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """``jpeg_compression_uint8`` on float images: read as 8-bit levels, returned as levels / 255."""
    return _on_levels(jpeg_compression_uint8, images, severity, generator)


def pixelate_uint8(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Pillow's BOX downscale to int(W c) x int(H c), then NEAREST upscale back, on uint8 (B, 3, H, W).

    OpenCV backend (CPU tensors; ``ops.backend``): the reference's own two Pillow resizes, so equal to it
    by construction. (Resizing the three planes as grey images instead is ~40% slower: Pillow's RGB path
    resamples 4 bytes at once.) Torch backend (other devices): ``_pillow_box`` and ``_pillow_nearest``,
    the same integer arithmetic and sample positions, so the same levels.
    """
    ratio = PIXELATE_RATIO[severity - 1]
    h, w = images.shape[-2:]
    small = (int(w * ratio), int(h * ratio))
    if ops.backend(images) == "torch":
        x = _pillow_box(_pillow_box(images.int(), -1, small[0]), -2, small[1])
        return _pillow_nearest(_pillow_nearest(x, -1, w), -2, h).to(torch.uint8)

    def resize(planes: np.ndarray) -> np.ndarray:
        # Image.merge interleaves the planes into Pillow's RGBX in one pass (cv2.merge + fromarray take two).
        image = Image.merge("RGB", [Image.fromarray(plane) for plane in planes])
        return np.asarray(image.resize(small, Image.BOX).resize((w, h), Image.NEAREST))

    return _per_image_hwc(images, resize, (0, 1, 2))


def jpeg_compression_uint8(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Encode and decode each uint8 (3, H, W) image as JPEG at the severity's quality (4:2:0, libjpeg-turbo).

    OpenCV's codec gives the bytes and pixels of the reference's Pillow ``save(quality=q)``; it codes
    interleaved BGR. On the CPU whatever the images' device (torch has no JPEG encoder; a GPU codec such
    as nvJPEG would not give libjpeg's pixels): images on another device are copied there and back.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY[severity - 1]]

    def roundtrip(planes: np.ndarray) -> np.ndarray:
        bgr = cv2.merge([planes[2], planes[1], planes[0]])
        return cv2.imdecode(cv2.imencode(".jpg", bgr, params)[1], cv2.IMREAD_COLOR)

    return _per_image_hwc(images, roundtrip, (2, 1, 0))


def elastic_transform(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Move every pixel by a smooth random displacement (bilinear resampling, reflected borders)."""
    b, _, h, w = images.shape
    return warp(images, elastic_field(b, h, w, severity, generator, images.device), "bilinear").clamp_(0.0, 1.0)


def elastic_field(batch: int, height: int, width: int, severity: int, generator: Generators,
                  device: torch.device | str | None = None) -> Tensor:
    """Displacement (dy, dx) in pixels, (B, 2, H, W) on ``device``: uniform noise in +-0.005 H, Gaussian-smoothed
    with sigma 0.01 (H, W) (reflect borders, truncate 3), times alpha; one field per image generator."""
    amplitude = ELASTIC_NOISE * height
    noise = ops.draw(generator, batch, lambda g: ops.uniform(g, -amplitude, amplitude, (2, height, width)), device)
    smooth = ops.gaussian_filter(noise, (ELASTIC_SIGMA * height, ELASTIC_SIGMA * width), mode="reflect",
                                 truncate=ELASTIC_TRUNCATE)
    return smooth.mul_(ELASTIC_ALPHA[severity - 1])


def warp(x: Tensor, field: Tensor, mode: str) -> Tensor:
    """Resample x (B, C, H, W) at (y + dy, x + dx) for field (B, 2, H, W) = (dy, dx).

    Outside the image the signal is mirrored about the border pixels' outer edges (d c b a | a b c d),
    scipy.ndimage's ``reflect`` mode. ``bilinear`` equals ``map_coordinates(order=1, mode='reflect')``;
    ``nearest`` rounds the reflected coordinate half up, as ``order=0`` does, for label maps.
    """
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"unknown warp mode {mode!r}; expected bilinear or nearest")
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    rows, wy = _linear_taps(field[:, 0], h, torch.arange(h, dtype=field.dtype, device=field.device).view(h, 1))
    cols, wx = _linear_taps(field[:, 1], w, torch.arange(w, dtype=field.dtype, device=field.device))
    if mode == "nearest":
        # Rounding half up in the reflected frame, as scipy reflects the coordinate before rounding.
        index = _flat_index(rows + (wy >= 0.5), cols + (wx >= 0.5), w).view(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, index).view(b, c, h, w)
    corner = _flat_index(rows, cols, w).view(b, 1, h * w)
    wx, wy = wx.reshape(b, 1, h, w), wy.reshape(b, 1, h, w)

    def at(offset: int) -> Tensor:
        # The +1 neighbours of the last row or column have weight 0; clamping keeps their reads in bounds.
        index = (corner + offset).clamp_(max=h * w - 1).expand(b, c, h * w)
        return flat.gather(2, index).view(b, c, h, w)

    top = torch.lerp(at(0), at(1), wx)
    bottom = torch.lerp(at(w), at(w + 1), wx)
    return torch.lerp(top, bottom, wy)


@lru_cache(maxsize=64)
def _pillow_box_taps(n: int, size: int) -> tuple[Tensor, Tensor]:
    """Pillow's 8-bit BOX taps from ``n`` samples to ``size``: source index (size, K) and int32 weight (size, K),
    zero-padded.

    Pillow (Resample.c: ``precompute_coeffs``, ``normalize_coeffs_8bpc``): output sample j averages the
    inputs whose centres fall in the box (j + 0.5) * scale +- scale / 2 (at least one), with weights
    normalised in float64 and then rounded to fixed point, each step in Pillow's order and precision.
    """
    scale = n / size
    reciprocal = 1.0 / max(scale, 1.0)
    support = 0.5 * max(scale, 1.0)
    taps = []
    for j in range(size):
        centre = (j + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        count = min(int(centre + support + 0.5), n) - first
        weights = [1.0 if -0.5 < (i + first - centre + 0.5) * reciprocal <= 0.5 else 0.0 for i in range(count)]
        total = sum(weights)
        taps.append([(first + i, int(0.5 + weight / total * (1 << PILLOW_PRECISION_BITS)))
                     for i, weight in enumerate(weights) if weight])
    width = max(len(row) for row in taps)
    padded = [row + [(0, 0)] * (width - len(row)) for row in taps]
    table = torch.tensor(padded)
    return table[..., 0], table[..., 1].int()


def _pillow_box(x: Tensor, dim: int, size: int) -> Tensor:
    """Pillow's 8-bit BOX resampling of integer levels along ``dim`` (-1 or -2) of (..., H, W) to ``size``:
    the ``_pillow_box_taps`` sum, rounded and clipped to 0..255 (``clip8``). Pillow does the width first
    and stores 8 bits in between, so callers resize -1 then -2. Exact in int32: the sums stay below 2^31."""
    index, coeff = (t.to(x.device) for t in _pillow_box_taps(x.shape[dim], size))
    shape = [1] * x.ndim
    shape[dim] = size
    acc = torch.full((), 1 << (PILLOW_PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(index.shape[1]):
        acc = acc + x.index_select(dim, index[:, k]) * coeff[:, k].view(shape)
    return (acc >> PILLOW_PRECISION_BITS).clamp_(0, 255)


@lru_cache(maxsize=64)
def _pillow_nearest_index(n: int, size: int) -> Tensor:
    """Source of each of ``size`` samples in Pillow's NEAREST resize of ``n``: int(x_j), x_j = scale / 2 +
    j * scale accumulated in float64 as Geometry.c ``ImagingScaleAffine`` does."""
    scale = n / size
    index, position = [], scale * 0.5
    for _ in range(size):
        index.append(int(position))
        position += scale
    return torch.tensor(index)


def _pillow_nearest(x: Tensor, dim: int, size: int) -> Tensor:
    """Pillow's NEAREST resize along ``dim`` of (..., H, W) to ``size``."""
    return x.index_select(dim, _pillow_nearest_index(x.shape[dim], size).to(x.device))


def _channel_max(images: Tensor) -> Tensor:
    r, g, b = images.unbind(1)
    return torch.maximum(torch.maximum(r, g), b).unsqueeze(1)


def _channel_min(images: Tensor) -> Tensor:
    r, g, b = images.unbind(1)
    return torch.minimum(torch.minimum(r, g), b).unsqueeze(1)


def _flat_index(rows: Tensor, cols: Tensor, width: int) -> Tensor:
    return rows.long().mul_(width).add_(cols.long())


def _linear_taps(shift: Tensor, size: int, base: Tensor) -> tuple[Tensor, Tensor]:
    """For positions base + shift along an axis of ``size``: the lower in-image pixel and the weight of the
    pixel after it, so that value = lerp(x[lower], x[lower + 1], weight) under reflect boundaries.

    Integer and fractional parts are split before adding the (large) base so the weight keeps float32's
    full precision. With m = (base + floor(shift)) mod 2 size, the pair (m, m + 1) is read forwards for
    m < size, backwards (weight 1 - f, from the mirrored pixel 2 size - 2 - m) for m >= size, and folds onto
    one pixel (weight 0) at m = size - 1 and m = 2 size - 1.
    """
    whole = torch.floor(shift)
    frac = shift - whole
    m = whole.add_(base).remainder_(2 * size)
    mirrored = m >= size
    lower = torch.where(mirrored, (2 * size - 2 - m).clamp_(min=0), m)
    weight = torch.where(mirrored, 1.0 - frac, frac)
    return lower, weight.masked_fill_(m.remainder(size) == size - 1, 0.0)


def _on_levels(fn: Callable[[Tensor, int, Generators], Tensor], images: Tensor, severity: int,
               generator: Generators) -> Tensor:
    levels = images.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return fn(levels, severity, generator).float().div_(255)


def _per_image_hwc(images: Tensor, fn: Callable[[np.ndarray], np.ndarray], channels: tuple[int, ...]) -> Tensor:
    """Apply ``fn`` to the planes (C, H, W) of each image of uint8 (B, C, H, W); it returns an interleaved
    (H, W, C) array whose channels are the planes in ``channels`` order, extracted straight into the output
    planes. Images run in parallel threads (OpenCV and Pillow release the GIL), on the CPU: images on
    another device are copied there and the result copied back."""
    planes = images.cpu().contiguous().numpy()
    out = torch.empty(images.shape, dtype=torch.uint8)
    out_planes = out.numpy()

    def one(i: int) -> None:
        result = fn(planes[i])
        for k, c in enumerate(channels):
            cv2.extractChannel(result, k, dst=out_planes[i, c])

    ops.parallel_map(one, len(planes))
    return out.to(images.device)
