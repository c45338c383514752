"""The 15 ImageNet-C corruptions and 4 extras (Hendrycks & Dietterich, ICLR 2019) at severities 1-5,
as batched torch functions ``name(images, severity, generator) -> images`` on float (B, 3, H, W) in [0, 1].

Size convention: the constants are those of the ``imagecorruptions`` package, which is what the
segmentation benchmarks (Cityscapes-C, ADE20K-C, Kamann & Rother CVPR 2020) ran at each dataset's
native resolution. Pixel-unit parameters (blur radii and sigmas, snow streak length, spatter blob
size) are kept in pixels, so they are relatively milder on large images, exactly as in those
benchmarks; relative ones (zoom factors, pixelate ratio, elastic displacement and smoothness, fog
fractal size, frost crop) scale with the image. Report the resolution you corrupt at.

``corrupt`` is the entry point for uint8 images and label maps: it quantises like the reference
(truncation to uint8) and moves the labels of geometric corruptions with the same displacement field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from trustseg.errors import UserError
from trustseg.robustness.corruptions.blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from trustseg.robustness.corruptions.digital import (brightness, contrast, elastic_field, elastic_transform,
                                                     jpeg_compression, jpeg_compression_uint8, pixelate,
                                                     pixelate_uint8, saturate, warp)
from trustseg.robustness.corruptions.noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from trustseg.robustness.corruptions import ops
from trustseg.robustness.corruptions.ops import Generators, per_image
from trustseg.robustness.corruptions.weather import fog, frost, frost_source, snow, spatter

CorruptionFn = Callable[[Tensor, int, Generators], Tensor]

# Hendrycks & Dietterich's order; the reference package numbers corruptions 0..18 in this order.
CORRUPTIONS: dict[str, CorruptionFn] = {fn.__name__: fn for fn in (
    gaussian_noise, shot_noise, impulse_noise,
    defocus_blur, glass_blur, motion_blur, zoom_blur,
    snow, frost, fog, brightness,
    contrast, elastic_transform, pixelate, jpeg_compression,
    speckle_noise, gaussian_blur, spatter, saturate,
)}

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "extra": ("speckle_noise", "gaussian_blur", "spatter", "saturate"),
}
COMMON: tuple[str, ...] = tuple(name for family in ("noise", "blur", "weather", "digital") for name in FAMILIES[family])

# Corruptions defined on 8-bit levels (Pillow resampling, JPEG coding): ``corrupt`` runs these uint8 -> uint8
# forms, which equal the float ones on uint8 input without the round trip through float.
ON_UINT8: dict[str, CorruptionFn] = {"pixelate": pixelate_uint8, "jpeg_compression": jpeg_compression_uint8}

# Images per call of a float corruption: about 2^19 pixels (6 MB as float32) at a time. A batch of large
# images in one piece spends more time faulting in fresh pages and missing caches than computing (2-4x
# slower for 8 images of 512x1024, measured); per-image generators make the split invisible.
CHUNK_PIXELS = 1 << 19

# Geometric corruptions move pixels, so the label map must move with them: name -> displacement field.
DISPLACEMENTS = {"elastic_transform": elastic_field}

SEVERITIES = (1, 2, 3, 4, 5)


def family_of(name: str) -> str:
    return next(family for family, names in FAMILIES.items() if name in names)


def check_corruption(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise UserError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise UserError(f"corruption severity {severity!r} is outside 1-5")


def corrupt(images: Tensor, name: str, severity: int, generator: Generators,
            masks: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Corrupt uint8 images (B, 3, H, W) -> uint8, with optional label maps (B, H, W) moved alongside.

    Photometric corruptions return ``masks`` unchanged; geometric ones warp them with the image's
    displacement field (nearest neighbour). Runs on the images' device (see ``ops`` for the few steps that
    run on the CPU); masks must be on the same device. Same generator state, same output, on any machine
    and any device, up to float rounding: where the exact result is a whole level, rounding may put it
    either side of the truncation, so a level may differ by one (measured: 1.2% of values for defocus
    blur at severity 1, whose disk kernel makes such ties common; at most 0.05% for the other corruptions).
    """
    check_corruption(name, severity)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt expects uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if min(h, w) < 32:
        raise UserError(f"images of {w}x{h} are too small to corrupt; width and height must be at least 32 pixels")
    if name in ON_UINT8:
        return ON_UINT8[name](images, severity, generator), masks
    step = max(1, CHUNK_PIXELS // (h * w))
    # Chunks help CPU caches; an accelerator takes the batch in one piece (the same output either way).
    if isinstance(generator, torch.Generator) or b <= step or images.device.type != "cpu":
        return _corrupt_floats(images, name, severity, generator, masks)
    # One generator per image: each image's result is independent of the batch, so it may be split, and
    # the chunks run in parallel threads (see ``_run_chunks``).
    generators = per_image(generator, b)
    out = torch.empty_like(images)
    moved = masks if masks is None or name not in DISPLACEMENTS else torch.empty_like(masks)

    def run(i: int) -> None:
        part = slice(i, i + step)
        out[part], chunk_masks = _corrupt_floats(images[part], name, severity, generators[part],
                                                 None if masks is None else masks[part])
        if moved is not masks:
            moved[part] = chunk_masks

    # A generator listed for several images must serve them in order.
    _run_chunks(run, range(0, b, step), parallel=len({id(g) for g in generators}) == b)
    return out, moved


def _run_chunks(run: Callable[[int], None], starts: Sequence[int], parallel: bool) -> None:
    """``run`` every chunk; in parallel on a pool of ``torch.get_num_threads()`` threads, each running its
    torch ops on one thread.

    Chunks of one image are too small for OpenMP's fork-join to pay: on a busy machine each parallel
    op waits for a descheduled thread (5-20x slower at 2 threads, measured), while a pool takes chunks
    as threads come free. The process-wide thread setting is restored afterwards.
    """
    threads = torch.get_num_threads()
    if not parallel or threads == 1 or len(starts) == 1:
        for start in starts:
            run(start)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(ops.in_caller_context(run), starts))
    finally:
        torch.set_num_threads(threads)


def _corrupt_floats(images: Tensor, name: str, severity: int, generator: Generators,
                    masks: Tensor | None) -> tuple[Tensor, Tensor | None]:
    x = images.float().div_(255)
    if name in DISPLACEMENTS:
        b, _, h, w = x.shape
        field = DISPLACEMENTS[name](b, h, w, severity, generator, x.device)
        x = warp(x, field, "bilinear")
        if masks is not None:
            masks = warp(masks[:, None].float(), field, "nearest")[:, 0].to(masks.dtype)
    else:
        x = CORRUPTIONS[name](x, severity, generator)
    # The reference returns np.uint8(clip(x, 0, 1) * 255): truncation, not rounding. NumPy's cast is several
    # times faster than torch's on CPU; torch's, the same truncation towards zero, runs on any device.
    levels = x.contiguous().clamp_(0, 1).mul_(255)
    if ops.backend(levels) == "opencv" and levels.device.type == "cpu":
        return torch.from_numpy(levels.numpy().astype(np.uint8)), masks
    return levels.to(torch.uint8), masks


def parse_corruptions(text: str) -> tuple[str, ...]:
    """``all`` (19), ``common`` (15), a family name, or comma-separated names -> corruption names."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "all":
            names.extend(CORRUPTIONS)
        elif part == "common":
            names.extend(COMMON)
        elif part in FAMILIES:
            names.extend(FAMILIES[part])
        elif part in CORRUPTIONS:
            names.append(part)
        else:
            raise UserError(f"unknown corruption {part!r}; expected all, common, a family "
                            f"({', '.join(FAMILIES)}) or names from: {', '.join(CORRUPTIONS)}")
    if not names:
        raise UserError("no corruptions selected; pass e.g. --corruptions all or gaussian_noise,fog")
    return tuple(dict.fromkeys(names))


def parse_severities(text: str) -> tuple[int, ...]:
    """``1-5``, ``3`` or ``1,3,5`` -> severities, each checked to be in 1-5."""
    severities: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            low, _, high = part.partition("-")
            severities.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"cannot read severities {text!r}; expected e.g. 1-5, 3 or 1,3,5") from None
    bad = [s for s in severities if s not in SEVERITIES]
    if bad or not severities:
        raise UserError(f"severities {text!r} must lie in 1-5")
    return tuple(sorted(set(severities)))


__all__ = ["COMMON", "CORRUPTIONS", "FAMILIES", "SEVERITIES", "check_corruption", "corrupt", "family_of",
           "frost_source", "parse_corruptions", "parse_severities"]
