"""Tensor primitives shared by the corruption families: per-image random draws, the scipy.ndimage-style
filters (``correlate_separable`` under ``gaussian_filter`` and ``filter1d``, ``correlate2d``), the
clipped zoom and motion blur.

Images inside the corruption functions are float32 (B, 3, H, W) in [0, 1], as the reference
``imagecorruptions`` package works on ``x / 255``, on any device.

Devices: random draws always come from CPU ``torch.Generator``s and are moved to the images' device, so
a seed gives the same corruption on every device. Operations that have a fast CPU library form (the
filters: OpenCV) and a pure-torch form pick one by ``backend(x)``: OpenCV for CPU tensors, torch for
every other device; ``use_backend`` overrides the choice (the tests run the torch forms on CPU and
compare them with the OpenCV ones).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import wraps

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator]

BACKENDS = ("opencv", "torch")
_FORCED_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("corruption_backend", default=None)


def backend(x: Tensor) -> str:
    """``"opencv"`` for CPU tensors (SIMD library code, several times faster there), ``"torch"`` for tensors
    on any other device; ``use_backend`` overrides this."""
    return _FORCED_BACKEND.get() or ("opencv" if x.device.type == "cpu" else "torch")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the corruptions inside the ``with`` block on backend ``name`` whatever the device (None: by device).

    ``"opencv"`` on a non-CPU tensor copies it to the CPU and back. Threads started by the corruptions
    (``parallel_map``, ``corrupt``'s chunks) inherit the choice.
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown corruption backend {name!r}; expected one of {', '.join(BACKENDS)}")
    token = _FORCED_BACKEND.set(name)
    try:
        yield
    finally:
        _FORCED_BACKEND.reset(token)


def in_caller_context(fn: Callable[[int], None]) -> Callable[[int], None]:
    """``fn`` run in a copy of the calling thread's context (so pool threads see ``use_backend``)."""
    context = contextvars.copy_context()
    return lambda i: context.copy().run(fn, i)


def per_image(generator: Generators, batch: int) -> list[torch.Generator]:
    """One generator per image: a sequence is used as given, a single generator serves every image in turn.

    Passing one generator per image makes each image's corruption independent of the batch it is in.
    """
    if isinstance(generator, torch.Generator):
        return [generator] * batch
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} images")
    return generators


def draw(generator: Generators, batch: int, sample: Callable[[torch.Generator], Tensor],
         device: torch.device | str | None = None) -> Tensor:
    """Stack ``sample(g)`` over the per-image generators: random fields of shape (B, ...), drawn on the CPU
    (where the generators live, so every device sees the same draw) and then moved to ``device``."""
    return torch.stack([sample(g) for g in per_image(generator, batch)]).to(device)


def uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0, shape: Sequence[int] = ()) -> Tensor:
    """Uniform floats in [low, high) drawn from ``generator`` (float64 for scalars, as NumPy draws)."""
    dtype = torch.float64 if not shape else torch.float32
    return torch.rand(tuple(shape), generator=generator, dtype=dtype) * (high - low) + low


def extend_indices(size: int, radius: int, mode: str) -> Tensor:
    """Source indices of a 1-D signal of ``size`` padded by ``radius`` on both sides, scipy.ndimage modes.

    ``nearest`` repeats the edge (a a | a b c); ``reflect`` mirrors about the edge including it
    (b a | a b c, NumPy's "symmetric"); ``mirror`` excludes it (c b | a b c).
    """
    index = torch.arange(-radius, size + radius)
    if mode == "nearest":
        return index.clamp(0, size - 1)
    if mode == "reflect":
        period = 2 * size
        index = index % period
        return torch.where(index >= size, period - 1 - index, index)
    if mode == "mirror":
        if size == 1:
            return torch.zeros_like(index)
        period = 2 * size - 2
        index = index % period
        return torch.where(index >= size, period - index, index)
    raise ValueError(f"unknown padding mode {mode!r}; expected nearest, reflect or mirror")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage's Gaussian taps: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return (weights / weights.sum()).float()


# scipy.ndimage boundary modes as OpenCV borders: 'reflect' repeats the edge sample (d c b a | a b c d),
# 'mirror' does not (d c b | a b c d). OpenCV folds indices repeatedly, so kernels wider than the image
# are handled like scipy's (checked in tests/robustness/test_ops.py).
_CV2_BORDERS = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT, "mirror": cv2.BORDER_REFLECT_101}


def parallel_map(fn: Callable[[int], None], count: int) -> None:
    """Run ``fn(0) .. fn(count - 1)`` on up to ``torch.get_num_threads()`` threads.

    For per-image or per-plane OpenCV / Pillow calls, which release the GIL while they work.
    """
    workers = min(count, torch.get_num_threads())
    if workers <= 1:
        for i in range(count):
            fn(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(in_caller_context(fn), range(count)))


def _cv2_border(mode: str) -> int:
    if mode not in _CV2_BORDERS:
        raise ValueError(f"unknown padding mode {mode!r}; expected nearest, reflect or mirror")
    return _CV2_BORDERS[mode]


def _per_plane(x: Tensor, fn: Callable[[np.ndarray, np.ndarray], None]) -> Tensor:
    """Apply ``fn(src, dst)`` to every (H, W) plane of float (..., H, W); dst is the plane's output array.

    Runs on the CPU: a tensor on another device is copied there and the result copied back.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    h, w = x.shape[-2:]
    planes = x.detach().reshape(-1, h, w).cpu().contiguous()
    out = torch.empty_like(planes)
    src, dst = planes.numpy(), out.numpy()
    parallel_map(lambda i: fn(src[i], dst[i]), len(src))
    return out.view(x.shape).to(x.device)


def _padded(planes: Tensor, dim: int, radius: int, mode: str) -> Tensor:
    """``planes`` extended by ``radius`` samples on both sides of ``dim`` with scipy.ndimage's ``mode``.

    An index gather rather than ``F.pad``: it also covers 'reflect' (edge repeated, which ``F.pad`` lacks)
    and pads wider than the signal (OpenCV and scipy fold such indices repeatedly, ``F.pad`` refuses).
    """
    if radius == 0:
        return planes
    index = extend_indices(planes.shape[dim], radius, mode).to(planes.device)
    return planes.index_select(dim, index)


def _torch_correlate(x: Tensor, kernels: Sequence[Tensor], mode: str) -> Tensor:
    """Correlate each (H, W) plane of float (..., H, W) with (K_y, K_x) ``kernels`` in turn, edges in scipy
    ``mode``: ``conv2d`` on any device, the pure-torch form of the OpenCV filters.

    Computed in float64 and rounded once to the input's precision (float32 for other dtypes): TF32, which
    cuDNN uses for float32 convolutions on recent GPUs by default, would cost three decimal digits, and
    float64 keeps the result within float rounding of scipy's float64 filters on every device.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h, w = x.shape[-2:]
    planes = x.detach().reshape(-1, 1, h, w).double()
    for kernel in kernels:
        if kernel.ndim != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"filter kernels must be 2-D with odd sides, got {tuple(kernel.shape)}")
        planes = _padded(planes, 2, kernel.shape[0] // 2, mode)
        planes = _padded(planes, 3, kernel.shape[1] // 2, mode)
        planes = F.conv2d(planes, kernel.to(planes.device, torch.float64)[None, None])
    return planes.to(dtype).view(x.shape)


def correlate_separable(x: Tensor, taps_y: Tensor, taps_x: Tensor, mode: str = "nearest") -> Tensor:
    """Correlate each (H, W) plane of float (..., H, W) with odd 1-D ``taps_y`` down and ``taps_x`` across.

    Edges follow scipy.ndimage ``mode``. OpenCV backend (``backend``): ``sepFilter2D`` (SIMD, one call per
    plane, planes in parallel threads), which accumulates in the input's precision: float32 results are
    within ~3e-7 of scipy's float64 ones; several times faster than ``conv2d`` with (1, K) kernels on CPU.
    Torch backend: two ``conv2d`` passes (``_torch_correlate``).
    """
    border = _cv2_border(mode)
    if backend(x) == "torch":
        return _torch_correlate(x, (taps_y.reshape(-1, 1), taps_x.reshape(1, -1)), mode)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ky, kx = (t.to(dtype).contiguous().cpu().numpy() for t in (taps_y, taps_x))
    depth = cv2.CV_64F if dtype == torch.float64 else cv2.CV_32F
    return _per_plane(x, lambda src, dst: cv2.sepFilter2D(src, depth, kx, ky, dst=dst, borderType=border))


def correlate2d(x: Tensor, kernel: Tensor, mode: str = "mirror") -> Tensor:
    """Correlate each (H, W) plane of float (..., H, W) with an odd (K, K) ``kernel``, edges in scipy ``mode``.

    OpenCV backend: ``filter2D`` (which switches to a DFT for large kernels), as the reference calls it.
    Torch backend: one ``conv2d`` (``_torch_correlate``).
    """
    border = _cv2_border(mode)
    if backend(x) == "torch":
        return _torch_correlate(x, (kernel,), mode)
    weights = kernel.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous().cpu().numpy()
    return _per_plane(x, lambda src, dst: cv2.filter2D(src, -1, weights, dst=dst, borderType=border))


def filter1d(x: Tensor, taps: Tensor, dim: int, mode: str = "nearest") -> Tensor:
    """Correlate the last two dims' ``dim`` (-1 = width, -2 = height) of (..., H, W) with 1-D ``taps``."""
    if dim not in (-1, -2):
        raise ValueError(f"filter1d filters dim -1 or -2, got {dim}")
    identity = torch.ones(1, dtype=taps.dtype)
    return correlate_separable(x, taps if dim == -2 else identity, taps if dim == -1 else identity, mode)


def gaussian_filter(x: Tensor, sigma: float | tuple[float, float], *, mode: str = "nearest",
                    truncate: float = 4.0) -> Tensor:
    """Gaussian blur of the last two dims of (..., H, W), equal to ``scipy.ndimage.gaussian_filter``
    (and so to ``skimage.filters.gaussian`` with ``channel_axis``); ``sigma`` is (sigma_y, sigma_x) or one."""
    sigma_y, sigma_x = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    taps_y, taps_x = (gaussian_kernel1d(s, truncate) if s > 0 else torch.ones(1) for s in (sigma_y, sigma_x))
    return correlate_separable(x, taps_y, taps_x, mode)


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _zoom_taps(size: int, factor: float) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
    """Crop start and linear-interpolation taps (lower index, upper index, upper weight) of a clipped zoom.

    The crop is ceil(size / factor) wide and centred with offset (size - crop) // 2; zooming it by
    ``factor`` gives round(crop * factor) >= size samples, of which the first ``size`` are kept.
    Positions follow scipy.ndimage.zoom with grid_mode=False: sample k sits at k * (crop - 1) / (out - 1),
    computed in float64 as scipy does, so the floor and the weights match it. Also returned: the samples
    that land past the last input by rounding (e.g. 159 * 63 / 159 = 63.00000000000001), which scipy's
    default mode='constant' sets to 0, a dark last row or column that the reference keeps.
    """
    crop = math.ceil(size / factor)
    top = (size - crop) // 2
    out = round(crop * factor)
    step = (crop - 1) / (out - 1) if out > 1 else 1.0
    position = torch.arange(size, dtype=torch.float64) * step
    lower = position.floor().clamp(max=crop - 1)
    upper = (lower + 1).clamp(max=crop - 1)
    outside = torch.nonzero(position > crop - 1).flatten()
    return top, lower.long(), upper.long(), (position - lower).float(), outside


def clipped_zoom(x: Tensor, factor: float) -> Tensor:
    """Zoom into the centre of (B, C, H, W) by ``factor`` >= 1, keeping the top-left H x W: (B, C, H, W).

    This is the reference's ``clipped_zoom`` (``imagecorruptions``, after Hendrycks & Dietterich,
    ICLR 2019): a centre crop of ceil(H / f) x ceil(W / f), bilinearly zoomed like
    ``scipy.ndimage.zoom(order=1)``, then cut to the input size. Rows and columns are interpolated
    separably from two gathered neighbours each, so the cost is linear in the number of pixels
    (columns with ``gather``: ``index_select`` along the last dim is several times slower on CPU).
    """
    if factor < 1:
        raise ValueError(f"clipped_zoom needs a zoom factor >= 1, got {factor}")
    shape = x.shape
    h, w = shape[-2:]
    top, row_lo, row_hi, row_t, row_out = _zoom_taps(h, factor)
    left, col_lo, col_hi, col_t, col_out = _zoom_taps(w, factor)
    crop = x.reshape(-1, h, w)[:, top:top + int(row_hi.max()) + 1, left:left + int(col_hi.max()) + 1]
    row_lo, row_hi, row_t, row_out, col_lo, col_hi, col_t, col_out = (
        t.to(x.device) for t in (row_lo, row_hi, row_t, row_out, col_lo, col_hi, col_t, col_out))
    rows = torch.lerp(crop.index_select(1, row_lo), crop.index_select(1, row_hi), row_t.to(x.dtype)[:, None])
    size = (rows.shape[0], h, w)
    out = torch.lerp(rows.gather(2, col_lo.expand(size)), rows.gather(2, col_hi.expand(size)), col_t.to(x.dtype))
    return out.index_fill_(1, row_out, 0).index_fill_(2, col_out, 0).view(shape)


def motion_shifts(radius: int, sigma: float, angle_deg: float, height: int, width: int) -> list[tuple[float, int, int]]:
    """Taps (weight, dy, dx) of the reference's motion blur along ``angle_deg``.

    ``imagecorruptions``' ``_motion_blur``: 2 * radius + 1 taps weighted by a one-sided Gaussian
    exp(-i^2 / (2 sigma^2)) (normalised), tap i moving the image by -ceil(i * (sin, cos)(angle) - 1/2),
    the direction taken as (w sin, w cos) / hypot as the reference does so that ties at exactly .5
    round the same way. Taps stop at the first one that would move the image by its full size.
    """
    taps = 2 * radius + 1
    weights = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(taps)]
    total = math.fsum(weights)
    point = (taps * math.sin(math.radians(angle_deg)), taps * math.cos(math.radians(angle_deg)))
    norm = math.hypot(*point)
    shifts = []
    for i in range(taps):
        dy = -math.ceil(i * point[0] / norm - 0.5)
        dx = -math.ceil(i * point[1] / norm - 0.5)
        if abs(dy) >= height or abs(dx) >= width:
            break
        shifts.append((weights[i] / total, dy, dx))
    return shifts


def motion_blur(x: Tensor, radius: int, sigma: float, angles_deg: Tensor) -> Tensor:
    """Motion-blur each image of (B, C, H, W) along its own angle in degrees ``angles_deg`` (B,): (B, C, H, W).

    Tap (weight, dy, dx) adds weight * x[clamp(y - dy), clamp(x - dx)]: the reference's ``shift``
    repeats the edge row and column into the uncovered band, which is replicate padding.
    """
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for b, angle in enumerate(angles_deg.tolist()):
        shifts = motion_shifts(radius, sigma, angle, h, w)
        pad = max(max(abs(dy), abs(dx)) for _, dy, dx in shifts)
        padded = F.pad(x[b:b + 1], (pad, pad, pad, pad), mode="replicate")[0] if pad else x[b]
        acc = torch.zeros_like(x[b])
        for weight, dy, dx in shifts:
            acc.add_(padded[:, pad - dy:pad - dy + h, pad - dx:pad - dx + w], alpha=weight)
        out[b] = acc
    return out


CorruptionFn = Callable[[Tensor, int, Generators], Tensor]


def image_by_image(corruption: CorruptionFn) -> CorruptionFn:
    """Run a batched corruption one image at a time, with the same output (each image draws from its own
    generator, in turn when one generator serves the batch).

    On CPU a 512 x 1024 image's float tensors (6 MB) stay cache- and allocator-friendly, while a batch
    of 16 (100 MB each) is bound by memory traffic and page faults: one at a time measured 1.5-2.5x
    faster per image for fog, shot and impulse noise and frost at 16 x 512 x 1024.
    """
    @wraps(corruption)
    def run(images: Tensor, severity: int, generator: Generators) -> Tensor:
        generators = per_image(generator, images.shape[0])
        return torch.cat([corruption(images[i:i + 1], severity, generators[i:i + 1]) for i in range(len(generators))])
    return run


def random_bits(shape: tuple[int, ...], generator: Generators, device: torch.device | str | None = None) -> Tensor:
    """Uniform integers in [0, 2^31), int32 (B, ...) = ``shape``; image i's from its generator, drawn on
    the CPU and moved to ``device``.

    Two per 64-bit draw: ``random_`` fills int64 with the generator's 64-bit output modulo 2^63 (63
    uniform bits), and both 32-bit halves masked to 31 bits are uniform. Twice as fast per value as
    ``uniform_``, and thresholds compare exactly in integers.
    """
    batch, n = shape[0], math.prod(shape[1:])
    words = torch.empty(batch, (n + 1) // 2, dtype=torch.int64)
    for row, g in zip(words, per_image(generator, batch)):
        row.random_(generator=g)
    bits = words.view(torch.int32)
    if n % 2:
        bits = bits[:, :n].contiguous()
    return bits.bitwise_and_(0x7FFFFFFF).view(shape).to(device)
