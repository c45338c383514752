"""Weather corruptions: fog, frost, spatter (water and mud) and snow on float (B, 3, H, W) in [0, 1].

Behaviour and per-severity constants follow Hendrycks & Dietterich (ICLR 2019) as implemented in the
``imagecorruptions`` package. Each corruption is split into a random draw (fractal, frost crop, noise
field, streak angle; one generator per image, see ``ops.per_image``) and a pure function of the images
and that draw (``fog_from_fractal``, ``frost_from_texture``, ``spatter_from_noise``,
``snow_from_noise``), so the deterministic part can be checked against the reference given the same draw.
The draws are made on the CPU and moved to the images' device, where the rest runs, except for the steps
noted as running on the CPU (the frost photographs' resizing, spatter's water highlights).
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from trustseg.robustness.corruptions import ops
from trustseg.robustness.corruptions.ops import Generators

# (fog strength c0, fractal wibble decay): larger c0 = thicker fog; smaller decay = rougher fog.
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))
# (weight of the image, weight of the frost texture).
FROST = ((1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))
# (noise mean, noise std, blur sigma, liquid threshold, strength, mud): strength scales the water
# highlights, or is the sigma that rounds the mud blots.
SPATTER = ((0.65, 0.3, 4, 0.69, 0.6, False), (0.65, 0.3, 3, 0.68, 0.6, False), (0.65, 0.3, 2, 0.68, 0.5, False),
           (0.65, 0.3, 1, 0.65, 1.5, True), (0.67, 0.4, 1, 0.65, 1.5, True))
# (flake noise mean, std, zoom, threshold, streak radius, streak sigma, weight of the unwhitened image).
SNOW = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))

WATER_RGB = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD_RGB = (63 / 255, 42 / 255, 20 / 255)  # brown
# The six photographs shipped with ``imagecorruptions``, in its order (its random index picks one).
FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# Per-channel mean and std (RGB) of those six photographs, averaged: the procedural frost matches them.
PROCEDURAL_FROST_MEAN = (0.52, 0.61, 0.65)
PROCEDURAL_FROST_STD = 0.12


# --------------------------------------------------------------------------------------------- fog

def _wrapped_pairs(x: Tensor, dim: int, offset: int) -> Tensor:
    """x[i] + x[(i + offset) mod n] along ``dim`` (offset +1 or -1): sums of neighbours on a torus."""
    n = x.shape[dim]
    if n == 1:
        return x + x
    out = torch.empty_like(x)
    first, second = (0, 1) if offset == 1 else (1, 0)
    torch.add(x.narrow(dim, first, n - 1), x.narrow(dim, second, n - 1), out=out.narrow(dim, first, n - 1))
    edge, wrap = (n - 1, 0) if offset == 1 else (0, n - 1)
    torch.add(x.narrow(dim, edge, 1), x.narrow(dim, wrap, 1), out=out.narrow(dim, edge, 1))
    return out


def _mean_plus_noise(total: Tensor, bits: Tensor, amplitude: float) -> Tensor:
    """total / 4 + u in [-amplitude, amplitude), u from ``random_bits`` (in place on ``total``)."""
    return total.mul_(0.25).add_(bits, alpha=2 * amplitude / 2 ** 31).sub_(amplitude)


def plasma_fractal(batch: int, size: int, wibbledecay: float, generator: Generators,
                   device: torch.device | str | None = None) -> Tensor:
    """Diamond-square plasma fractals (B, size, size) in [0, 1] on ``device``, ``size`` a power of two.

    The reference's heightmap: from a zero corner, each level sets square centres to the mean of their
    4 corners and edge midpoints to the mean of their 4 neighbours (2 centres, 2 corners; wrapping
    around, so the map tiles), each plus uniform noise in [-wibble^2, wibble^2] (the reference
    multiplies wibble by a draw in [-wibble, wibble]); wibble starts at 100 and is divided by
    ``wibbledecay`` per level. Each map is then rescaled to [0, 1] by its own minimum and maximum.
    Each level is built as a contiguous grid twice the size of the last, interleaving corners, edge
    midpoints and centres.
    """
    if size & (size - 1):
        raise ValueError(f"plasma fractal size must be a power of two, got {size}")
    # All of an image's noise in one draw (3 n^2 values at each level n = 1, 2, 4, ..., size / 2, that
    # is size^2 - 1), so that one generator serving the batch gives each image a contiguous stream.
    bits = ops.random_bits((batch, size * size - 1), generator, device)
    corners = torch.zeros(batch, 1, 1, device=device)
    wibble, used = 100.0, 0
    while corners.shape[1] < size:
        n, amplitude = corners.shape[1], wibble ** 2
        noise = bits[:, used:used + 3 * n * n].view(batch, 3, n, n)
        used += 3 * n * n
        # Corner (i, j) is map point (i, j) * step; its centre, top and left midpoints are offset by half a step.
        right = _wrapped_pairs(corners, 2, 1)
        below = _wrapped_pairs(corners, 1, 1)
        centres = _mean_plus_noise(_wrapped_pairs(right, 1, 1), noise[:, 0], amplitude)
        top = _mean_plus_noise(_wrapped_pairs(centres, 1, -1).add_(right), noise[:, 1], amplitude)
        left = _mean_plus_noise(_wrapped_pairs(centres, 2, -1).add_(below), noise[:, 2], amplitude)
        # Interleave columns through complex64 (real, imaginary), several times faster than stack(dim=-1).
        even_rows = torch.view_as_real(torch.complex(corners, top)).view(batch, n, 2 * n)
        odd_rows = torch.view_as_real(torch.complex(left, centres)).view(batch, n, 2 * n)
        corners = torch.stack([even_rows, odd_rows], 2).view(batch, 2 * n, 2 * n)
        wibble /= wibbledecay
    low = corners.amin(dim=(1, 2), keepdim=True)
    high = corners.amax(dim=(1, 2), keepdim=True)
    return corners.sub_(low).div_(high - low)


def fog_from_fractal(images: Tensor, fractal: Tensor, severity: int) -> Tensor:
    """Add fog ``c0 * fractal`` (B, H, W) to images (B, 3, H, W), keeping each image's peak brightness.

    The reference scales by max / (max + c0), max being the image's brightest value over all channels,
    so that the brightest pixel under the densest fog stays at most as bright as before.
    """
    strength = FOG[severity - 1][0]
    peak = images.amax(dim=(1, 2, 3), keepdim=True)
    fogged = torch.add(images, fractal[:, None], alpha=strength)
    return fogged.mul_(peak / (peak + strength)).clamp_(0, 1)


@ops.image_by_image
def fog(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Fog: a plasma fractal over the next power of two of the longer side, cropped to the image."""
    b, _, h, w = images.shape
    fractal = plasma_fractal(b, ops.next_power_of_two(max(h, w)), FOG[severity - 1][1], generator, images.device)
    return fog_from_fractal(images, fractal[:, :h, :w], severity)


# ------------------------------------------------------------------------------------------- frost

def _frost_photo_dir() -> Path | None:
    """The ``frost`` folder of an installed ``imagecorruptions``, found without importing the package
    (its import pulls in numba); None where it is not installed or its photographs are missing."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    return folder if all((folder / name).is_file() for name in FROST_PHOTOS) else None


def frost_source() -> str:
    """Which frost texture ``frost`` uses: ``"imagecorruptions"`` (the reference photographs) or
    ``"procedural"`` (``procedural_frost``, where that package is not installed)."""
    return "procedural" if _frost_photo_dir() is None else "imagecorruptions"


@lru_cache(maxsize=len(FROST_PHOTOS))
def _frost_photo(path: str) -> np.ndarray:
    """A frost photograph, decoded once: uint8 (h, w, 3) RGB."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read the frost photograph {path}")
    return np.ascontiguousarray(bgr[..., ::-1])


@lru_cache(maxsize=2 * len(FROST_PHOTOS))  # two image sizes' worth, ~50 MB at 512 x 1024
def _rescaled_frost(path: str, height: int, width: int) -> Tensor:
    """The photograph scaled to cover (height, width) with 10% to spare, as the reference: (3, h', w') in [0, 1].

    Scale factor max(1, H / h, W / w) * 1.1, new size ceil(side * factor), bicubic on uint8 (cv2
    INTER_CUBIC, which rounds and saturates to 8 bits as the reference's texture is).
    """
    photo = _frost_photo(path)
    factor = max(1.0, height / photo.shape[0], width / photo.shape[1]) * 1.1
    size = (math.ceil(photo.shape[1] * factor), math.ceil(photo.shape[0] * factor))
    rescaled = torch.from_numpy(cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC))
    return rescaled.permute(2, 0, 1).float().div_(255)


def photo_frost(batch: int, height: int, width: int, generator: Generators, folder: Path,
                device: torch.device | str | None = None) -> Tensor:
    """Random crops (B, 3, H, W) in [0, 1] of the reference's frost photographs: per image, a photograph,
    then a crop's top row and left column, drawn uniformly as the reference does.

    The photographs are rescaled once per image size on the CPU (OpenCV's 8-bit bicubic, as the reference's
    texture is) and cached there; only the crops move to ``device``.
    """
    crops = torch.empty(batch, 3, height, width)
    for crop, g in zip(crops, ops.per_image(generator, batch)):
        name = FROST_PHOTOS[int(torch.randint(len(FROST_PHOTOS), (), generator=g))]
        photo = _rescaled_frost(str(folder / name), height, width)
        top = int(torch.randint(photo.shape[1] - height, (), generator=g))
        left = int(torch.randint(photo.shape[2] - width, (), generator=g))
        crop.copy_(photo[:, top:top + height, left:left + width])
    return crops.to(device)


def procedural_frost(batch: int, height: int, width: int, generator: Generators,
                     device: torch.device | str | None = None) -> Tensor:
    """Frost-like textures (B, 3, H, W) in [0, 1] on ``device`` made from noise, for when the photographs
    are missing.

    Frost on glass is patchy cover crossed by thin bright crystal edges. Patches: a plasma fractal
    (wibble decay 2, as mild fog). Crystal edges: the zero crossings of smoothed Gaussian noise form a
    network of thin curves; exp(-(z / 0.35)^2) of the normalised noise z lights them up, at two scales
    (sigma 1 and 3 px). The sum is standardised and coloured with the per-channel mean and std of the
    six reference photographs (``PROCEDURAL_FROST_MEAN``, ``PROCEDURAL_FROST_STD``), so its brightness
    and contrast, and hence the corruption's strength, are in the photographs' range.
    """
    patches = plasma_fractal(batch, ops.next_power_of_two(max(height, width)), 2.0, generator, device)
    texture = patches[:, :height, :width] * 0.5
    for sigma, weight in ((1.0, 0.3), (3.0, 0.2)):
        noise = ops.draw(generator, batch, lambda g: torch.randn(height, width, generator=g), device)
        smooth = ops.gaussian_filter(noise[:, None], sigma)[:, 0]
        smooth /= smooth.std(dim=(1, 2), keepdim=True)
        texture += weight * torch.exp(-(smooth / 0.35) ** 2)
    texture = (texture - texture.mean(dim=(1, 2), keepdim=True)) / texture.std(dim=(1, 2), keepdim=True)
    mean = torch.tensor(PROCEDURAL_FROST_MEAN, device=texture.device)[:, None, None]
    return (mean + PROCEDURAL_FROST_STD * texture[:, None]).clamp_(0, 1)


def frost_from_texture(images: Tensor, texture: Tensor, severity: int) -> Tensor:
    """Blend images (B, 3, H, W) with frost textures (B, 3, H, W): c0 * x + c1 * texture, clipped."""
    image_weight, frost_weight = FROST[severity - 1]
    return torch.mul(texture, frost_weight).add_(images, alpha=image_weight).clamp_(0, 1)


@ops.image_by_image
def frost(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Frost: a random crop of one of the reference's six frost photographs (``procedural_frost`` where
    ``imagecorruptions`` is not installed; ``frost_source`` says which) blended over the image."""
    b, _, h, w = images.shape
    folder = _frost_photo_dir()
    texture = (procedural_frost(b, h, w, generator, images.device) if folder is None
               else photo_frost(b, h, w, generator, folder, images.device))
    return frost_from_texture(images, texture, severity)


# ----------------------------------------------------------------------------------------- spatter

def _water_highlights(liquid: np.ndarray) -> np.ndarray:
    """Shaded water drops (H, W) float32, max 1, from a quantised liquid layer uint8 (H, W).

    The reference's recipe, whose look is defined by OpenCV's operators: distance to the drop outlines
    (Canny edges), capped at 20 px and histogram-equalised, then an embossing kernel that lights one
    side of each drop; the result modulates the liquid layer.
    """
    distance = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, distance = cv2.threshold(distance, 20, 20, cv2.THRESH_TRUNC)
    distance = cv2.equalizeHist(cv2.blur(distance, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)
    distance = cv2.blur(cv2.filter2D(distance, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
    shade = liquid * distance
    peak = shade.max()
    # No drop edges at all (a blank liquid layer): the reference divides 0 by 0; no water is drawn.
    return shade / peak if peak > 0 else shade


def spatter_from_noise(images: Tensor, noise: Tensor, severity: int) -> Tensor:
    """Spatter images (B, 3, H, W) given standard normal noise (B, H, W).

    The liquid layer is mean + std * noise, Gaussian-blurred (scipy ``nearest`` borders) and zeroed
    below a threshold. Severities 1-3 add pale turquoise water drops (``_water_highlights``, per
    image); 4-5 paint brown mud over the blurred liquid mask where it exceeds 0.8. The reference
    applies its BGR conversions to an RGB array without swapping channels, so its water is RGB
    (175, 238, 238) added to the image, which is what this does. The water highlights are OpenCV's
    edge, distance and histogram operators on 8-bit layers, with no torch equivalent that gives the same
    levels: they run on the CPU (one (H, W) uint8 layer per image each way) and everything else on the
    images' device.
    """
    mean, std, sigma, threshold, strength, mud = SPATTER[severity - 1]
    liquid = ops.gaussian_filter((noise * std + mean)[:, None], sigma)[:, 0]
    if mud:
        cover = ops.gaussian_filter((liquid > threshold).float()[:, None], strength)[:, 0]
        cover = cover.masked_fill_(cover < 0.8, 0)[:, None]
        return torch.lerp(images, torch.tensor(MUD_RGB, device=images.device)[:, None, None], cover).clamp_(0, 1)
    # The reference truncates liquid * 255 to uint8; a layer above 1 would need an 8-sigma excursion.
    quantised = (liquid.masked_fill_(liquid < threshold, 0) * 255).clamp_(max=255).to(torch.uint8).cpu().numpy()
    shade = torch.from_numpy(np.stack([_water_highlights(layer) for layer in quantised])).to(images.device)
    return torch.addcmul(images, shade[:, None], torch.tensor(WATER_RGB, device=images.device)[:, None, None],
                         value=strength).clamp_(0, 1)


@ops.image_by_image
def spatter(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Spatter: water drops (severities 1-3) or mud (4-5) from a thresholded smooth noise layer."""
    b, _, h, w = images.shape
    noise = ops.draw(generator, b, lambda g: torch.randn(h, w, generator=g), images.device)
    return spatter_from_noise(images, noise, severity)


# -------------------------------------------------------------------------------------------- snow

def snow_from_noise(images: Tensor, noise: Tensor, angles_deg: Tensor, severity: int) -> Tensor:
    """Snow on images (B, 3, H, W) from standard normal noise (B, 1, H, W) and streak angles (B,).

    Flakes: mean + std * noise, zoomed in (``ops.clipped_zoom``) so they grow, zeroed below a
    threshold, motion-blurred into streaks along the angle and quantised to 8 bits as the reference
    does; the streak layer is added twice, once rotated by 180 degrees. The scene is first whitened:
    blended with max(x, 1.5 * grey + 0.5), grey = 0.299 R + 0.587 G + 0.114 B (OpenCV's RGB2GRAY).
    The reference blurs the zoomed layer before cutting it to the image; that layer has
    round(ceil(W / zoom) * zoom) columns, up to a few more than W. Streaks falling at angles above -90
    degrees are smeared from the right, so within (2 * radius + 1) px of the right edge (and, rotated,
    the left edge) they read those extra columns there but the repeated edge column here
    (``ops.clipped_zoom`` returns the cut layer); elsewhere the result equals the reference's.
    """
    mean, std, zoom, threshold, radius, sigma, keep = SNOW[severity - 1]
    flakes = ops.clipped_zoom(noise * std + mean, zoom)
    flakes = flakes.masked_fill_(flakes < threshold, 0).clamp_(0, 1)
    streaks = ops.motion_blur(flakes, radius, sigma, angles_deg).mul_(255).round_().div_(255)
    grey = images[:, :1] * 0.299
    grey.add_(images[:, 1:2], alpha=0.587).add_(images[:, 2:3], alpha=0.114)
    whitened = torch.maximum(images, grey.mul_(1.5).add_(0.5)).lerp_(images, keep)
    return whitened.add_(streaks).add_(streaks.flip(-2, -1)).clamp_(0, 1)


@ops.image_by_image
def snow(images: Tensor, severity: int, generator: Generators) -> Tensor:
    """Snow: streaks of zoomed, thresholded noise falling at an angle in [-135, -45) degrees."""
    b, _, h, w = images.shape
    noise = torch.empty(b, 1, h, w)
    angles = torch.empty(b, dtype=torch.float64)
    for i, g in enumerate(ops.per_image(generator, b)):
        noise[i].normal_(generator=g)
        angles[i] = ops.uniform(g, -135.0, -45.0)
    return snow_from_noise(images, noise.to(images.device), angles, severity)


__all__ = ["fog", "fog_from_fractal", "frost", "frost_from_texture", "frost_source", "photo_frost",
           "plasma_fractal", "procedural_frost", "snow", "snow_from_noise", "spatter", "spatter_from_noise"]
