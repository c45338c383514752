"""Blur corruptions: defocus, glass, motion, zoom and Gaussian blur on float (B, 3, H, W) in [0, 1].

Constants per severity 1-5 are those of Hendrycks & Dietterich (ICLR 2019) as shipped in the
``imagecorruptions`` package (fork ``imagecorruptions-imaug`` 1.1.5), whose outputs these functions
reproduce: exactly up to float rounding for the deterministic ones, in distribution for glass blur
(see ``glass_blur``). Blur radii and sigmas are in pixels, as in the reference.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

from trustseg.robustness.corruptions import ops
from trustseg.robustness.corruptions.ops import Generators

# Gaussian blur sigma in pixels (an extra corruption of the ImageNet-C release).
GAUSSIAN_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)
# Defocus: disk radius and the sigma of the small Gaussian that anti-aliases the disk.
DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
# Glass: Gaussian sigma, largest local pixel move, number of shuffling passes.
GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2))
# Motion: kernel radius (2 r + 1 taps) and sigma of its one-sided Gaussian weights; angle ~ U(-45, 45) deg.
MOTION = ((10, 3.0), (15, 5.0), (15, 8.0), (15, 12.0), (20, 15.0))
MOTION_ANGLE_DEG = 45.0
# Zoom: the reference's np.arange(1, stop, step); with float steps its length is ceil((stop - 1) / step)
# evaluated in floats, one more than the stop suggests at severity 1 (12 factors, up to 1.11).
ZOOM = ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11))
# Glass displacement table: runs x grid^2 simulated swaps; chains reach ~30 px at severity 5, so only the
# central 16 x 16 of each 80 x 80 grid is tabulated (64 x 256 = 16k offsets).
_GLASS_GRID, _GLASS_RUNS, _GLASS_CENTRE = 80, 64, 16
# Bins of the guide table that samples the displacement table: fine enough for ~1 cdf entry per bin.
_GLASS_BINS = 1 << 16


def gaussian_blur(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Separable Gaussian blur, edges repeated (skimage ``gaussian``: mode 'nearest', truncate 4)."""
    del generator  # deterministic
    return ops.gaussian_filter(images, GAUSSIAN_SIGMA[severity - 1]).clamp_(0, 1)


def defocus_kernel(radius: int, alias_sigma: float) -> Tensor:
    """The reference's anti-aliased disk (K, K) float64, its all-zero border trimmed.

    A binary disk of ``radius`` on a grid of half-size max(8, radius), normalised to sum 1, then blurred
    by a 3x3 (radius <= 8) or 5x5 Gaussian of ``alias_sigma`` with mirrored kernel edges, as
    ``cv2.GaussianBlur`` does with its default BORDER_REFLECT_101. Rows and columns below 1e-12 are
    dropped: with sigma 0.1 the outer taps are ~1e-22 and would only widen the convolution.
    """
    half = max(8, radius)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    size = 3 if radius <= 8 else 5
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-offsets ** 2 / (2 * alias_sigma ** 2))
    taps /= taps.sum()
    kernel = disk
    for dim in (-2, -1):
        kernel = ops.filter1d(kernel, taps, dim, mode="mirror")
    keep = kernel.abs().amax(dim=0) > 1e-12
    return kernel[keep][:, keep]


def defocus_blur(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Convolution with an anti-aliased disk, the out-of-focus point spread function of a thin lens."""
    del generator  # deterministic
    radius, alias_sigma = DEFOCUS[severity - 1]
    # cv2.filter2D's default border, BORDER_REFLECT_101, is scipy's 'mirror'.
    return ops.correlate2d(images, defocus_kernel(radius, alias_sigma), "mirror").clamp_(0, 1)


def motion_blur(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Linear motion blur along a random direction per image, U(-45, 45) degrees from the horizontal."""
    radius, sigma = MOTION[severity - 1]
    # The angles stay on the CPU: they only choose each image's shifts.
    angles = ops.draw(generator, images.shape[0], lambda g: ops.uniform(g, -MOTION_ANGLE_DEG, MOTION_ANGLE_DEG))
    return ops.motion_blur(images, radius, sigma, angles).clamp_(0, 1)


def zoom_factors(severity: int) -> list[float]:
    """The reference's np.arange(1, stop, step) values, computed as NumPy does: 1 + i * ((1 + step) - 1)."""
    step, count = ZOOM[severity - 1]
    delta = (1 + step) - 1
    return [1 + i * delta for i in range(count)]


def zoom_blur(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Mean of the image and its clipped zooms over a range of factors: a radial blur from the centre."""
    del generator  # deterministic
    factors = zoom_factors(severity)
    out = images.clone()
    for factor in factors:
        out += ops.clipped_zoom(images, factor)
    return (out / (len(factors) + 1)).clamp(0, 1)


@functools.lru_cache(maxsize=None)
def glass_displacements(max_delta: int, passes: int) -> tuple[Tensor, Tensor]:
    """Distribution of where an output pixel comes from after the reference's swap passes.

    Returns the flat table of offsets (K, 2) as (dy, dx) and their cumulative probabilities (K,).
    Each pass the reference visits the pixels max_delta + 1 .. size - max_delta in reverse raster order
    and swaps each with the pixel at a uniform offset in [-max_delta, max_delta - 1]^2 (``randint``,
    upper bound excluded). A swapped-out pixel that lands on a not-yet-visited position is carried on at
    that visit, so pixels travel along chains far beyond one window (e.g. per-axis variance ~3 px^2 for
    max_delta = 1, where one step alone gives 0.25). Here that process is simulated exactly on
    ``_GLASS_RUNS`` grids of ``_GLASS_GRID`` pixels, and the offsets of the central pixels (far from the
    edges the chains start at) are tabulated. Fixed seed: the table is a constant of the corruption.
    """
    generator = torch.Generator().manual_seed(0)
    size, runs = _GLASS_GRID, _GLASS_RUNS
    grid = np.tile(np.arange(size * size), (runs, 1))
    lanes = np.arange(runs)
    visits = range(size - max_delta, max_delta, -1)
    for _ in range(passes):
        draws = torch.randint(-max_delta, max_delta, (len(visits), len(visits), 2, runs), generator=generator)
        steps = (draws[:, :, 0] * size + draws[:, :, 1]).numpy()
        for i, h in enumerate(visits):
            for j, w in enumerate(visits):
                here = h * size + w
                there = here + steps[i, j]
                moved = grid[lanes, there]
                grid[lanes, there] = grid[:, here]
                grid[:, here] = moved
    margin = (size - _GLASS_CENTRE) // 2
    centre = np.arange(margin, margin + _GLASS_CENTRE)
    positions = (centre[:, None] * size + centre[None, :]).ravel()
    source = torch.from_numpy(grid[:, positions]).flatten()
    offsets = torch.stack([source // size - torch.from_numpy(positions // size).repeat(runs),
                           source % size - torch.from_numpy(positions % size).repeat(runs)], dim=1)
    table, counts = torch.unique(offsets, dim=0, return_counts=True)
    cdf = torch.cumsum(counts.double(), 0) / counts.sum()
    return table, cdf


@functools.lru_cache(maxsize=None)
def _glass_sampler(max_delta: int, passes: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Guide table for inverting the cdf of ``glass_displacements``: (table, cdf + [inf], first candidate per
    bin of [0, 1) in ``_GLASS_BINS`` bins, most cdf entries inside one bin)."""
    table, cdf = glass_displacements(max_delta, passes)
    start = torch.searchsorted(cdf, torch.arange(_GLASS_BINS + 1, dtype=torch.float64) / _GLASS_BINS, right=True)
    bounds = torch.cat([cdf, torch.tensor([math.inf], dtype=torch.float64)])
    return table, bounds, start[:-1], int((start[1:] - start[:-1]).max())


def glass_sources(generator: torch.Generator, height: int, width: int, max_delta: int, passes: int,
                  device: torch.device | str | None = None) -> Tensor:
    """Flat source index (H * W,) per output pixel on ``device``: offsets drawn from ``glass_displacements``,
    kept inside.

    Draw u ~ U[0, 1) and take the offset at searchsorted(cdf, u, right=True), found from the bin of u by a
    guide table and a step or two along the cdf: the same picks, 3x faster than ``searchsorted``. u is
    drawn on the CPU and the look-ups run on ``device``, exact integer and float64 steps, so every device
    picks the same offsets.
    """
    table, bounds, start, steps = _glass_sampler(max_delta, passes)
    table, bounds, start = table.to(device), bounds.to(device), start.to(device)
    u = torch.rand(height * width, generator=generator, dtype=torch.float64).to(device)
    pick = start[(u * _GLASS_BINS).long()]
    for _ in range(steps):
        pick += bounds[pick] <= u
    offsets = table[pick.clamp_(max=len(table) - 1)]
    rows = (torch.arange(height, device=u.device).repeat_interleave(width) + offsets[:, 0]).clamp(0, height - 1)
    cols = (torch.arange(width, device=u.device).repeat(height) + offsets[:, 1]).clamp(0, width - 1)
    return rows * width + cols


def glass_blur(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Frosted-glass look: blur, quantise to 8 bits, jitter pixels locally, blur again.

    The reference swaps each visited pixel with a random neighbour one at a time in reverse raster
    order (sequential numba loops), so a pixel can travel along a chain of swaps and neither its random
    stream nor its sequential dependence can be reproduced in parallel. Here each output pixel reads
    from an offset drawn independently from the reference process's own displacement distribution
    (``glass_displacements``, all passes together) in one gather. Same marginal displacement and the
    same blur-quantise-blur pipeline; but displacements are independent rather than a permutation (a
    source pixel may be duplicated or dropped), and the reference's untouched border band of
    max_delta pixels is jittered too. PSNR and SSIM to the clean image match the reference's within a
    few percent (tests/robustness/test_blur.py).
    """
    sigma, max_delta, passes = GLASS[severity - 1]
    b, c, h, w = images.shape
    # The reference quantises with np.uint8(x * 255): truncation.
    x = ops.gaussian_filter(images, sigma).clamp_(0, 1).mul_(255).floor_().div_(255)
    index = ops.draw(generator, b, lambda g: glass_sources(g, h, w, max_delta, passes, images.device))
    x = torch.gather(x.reshape(b, c, h * w), 2, index[:, None].expand(b, c, h * w)).view(b, c, h, w)
    return ops.gaussian_filter(x, sigma).clamp_(0, 1)
