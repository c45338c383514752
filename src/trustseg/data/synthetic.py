"""Procedural synthetic segmentation scenes: the built-in dataset behind ``trustseg demo`` and the tests.

Every scene is a textured background with 4-8 textured shapes drawn back to front, so later shapes
occlude earlier ones. What identifies a class is its *texture family and shape*, never its colour: each
region mixes two colours drawn from one distribution shared by all classes (background included), so a
per-pixel colour classifier does little better than predicting "background" everywhere, while a small
CNN reads the textures easily. Textures overlap in their parts (a dot lattice contains horizontal and
vertical gratings, a checkerboard two diagonal ones), so single filter responses are not enough either.

==========  ===================================  =============================================
class       shape                                texture family
==========  ===================================  =============================================
background  whole image                          smooth noise blobs (16-32 px cells)
disc        filled ellipse                       dot lattice, near axis-aligned
box         rotated rectangle                    checkerboard, near axis-aligned
triangle    random triangle                      near-horizontal stripes, period 5-8 px
ring        elliptical annulus                   near-vertical stripes, period 5-8 px
bar         long thin rotated rectangle          fine noise blobs (3 px cells)
beacon      small disc; RARE, 1-3 in ~20% of     fine diagonal stripes, period 3.5-4.5 px
            scenes, always on top (~1% of px)
==========  ===================================  =============================================

The whole scene then gets a global illumination change (gain, linear ramp, colour cast), a Gaussian
blur and sensor noise. Geometry is specified for a 128-pixel reference side and scaled with
``min(H, W)``, so other sizes show the same scenes at another resolution.

Sample ``i`` of a split is drawn from its own generator seeded by ``(seed, split, i)``: access order,
worker processes and ``num_images`` do not change it, and the splits are disjoint streams.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np
import torch

from trustseg.data.base import ClassInfo, Sample
from trustseg.errors import UserError

CLASS_NAMES = ("background", "disc", "box", "triangle", "ring", "bar", "beacon")
# Visually distinct colours (Trubetskoy's "20 distinct colours"), background black.
PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (240, 50, 230),
)
BACKGROUND, DISC, BOX, TRIANGLE, RING, BAR, BEACON = range(len(CLASS_NAMES))
COMMON_CLASSES = (DISC, BOX, TRIANGLE, RING, BAR)

# Stream id of each split; part of every sample's seed so the splits never share a scene.
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_IMAGES = {"train": 640, "val": 64, "test": 64}
MIN_SIZE = 32
# A 4096 x 4096 scene takes about 4 s and 200 MB to render; a larger side is taken for a typo (size=40960),
# refused instead of rendered until memory runs out.
MAX_SIZE = 4096
REFERENCE_SIDE = 128.0

Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (y (h, 1), x (1, w)) -> t float32 (h, w)
Layer = tuple[int, np.ndarray]  # (class index, bool (H, W) footprint before occlusion)


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Lengths are in pixels at a 128-pixel side and scale with ``min(H, W)``."""

    height: int = 128
    width: int = 128
    min_objects: int = 4
    max_objects: int = 8
    rare_prob: float = 0.2  # probability that a scene contains beacons (one to three)
    noise_std: float = 4.0  # sensor noise, grey levels
    max_blur_sigma: float = 0.6


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # int64 (H, W)
    layers: tuple[Layer, ...]  # back to front; the background is not a layer


# ---------------------------------------------------------------------------------------------------
# Texture fields: pure functions returning a float32 mixing weight t in [0, 1] of shape (H, W).
# y is a float32 (H, 1) column of row coordinates, x a (1, W) row of column coordinates.


def _rotated(y: np.ndarray, x: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return x * c + y * s, y * c - x * s


def _soft_square(wave: np.ndarray, sharpness: float = 2.0) -> np.ndarray:
    """Map a wave in [-1, 1] to a square-ish wave in [0, 1] with anti-aliased edges."""
    return np.clip(wave * sharpness, -1.0, 1.0) * 0.5 + 0.5


def stripes(y: np.ndarray, x: np.ndarray, angle: float, period: float, phase: float) -> np.ndarray:
    u, _ = _rotated(y, x, angle)
    return _soft_square(np.sin(u * (2 * math.pi / period) + phase))


def checkerboard(y: np.ndarray, x: np.ndarray, angle: float, period: float, phase: float) -> np.ndarray:
    u, v = _rotated(y, x, angle)
    k = 2 * math.pi / period
    return _soft_square(np.sin(u * k + phase) * np.sin(v * k + phase), sharpness=3.0)


def dots(y: np.ndarray, x: np.ndarray, angle: float, period: float, phase: float) -> np.ndarray:
    u, v = _rotated(y, x, angle)
    fu = (u / period + phase) % 1.0 - 0.5
    fv = (v / period + phase) % 1.0 - 0.5
    dist = np.sqrt(fu * fu + fv * fv) * period
    return np.clip(0.3 * period - dist + 0.5, 0.0, 1.0)


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth random blobs: uniform noise on a coarse grid of ``cell``-pixel spacing, bicubic upsampled."""
    gh, gw = int(height / cell) + 2, int(width / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    up = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    oy, ox = rng.integers(0, int(cell) + 1, size=2)
    return np.clip(up[oy : oy + height, ox : ox + width], 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Colours: one distribution for every class, so colour carries no class information.


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours far enough apart (>= 100 grey levels) for the texture between them to show."""
    while True:
        c1, c2 = rng.uniform(15.0, 240.0, size=(2, 3)).astype(np.float32)
        if np.linalg.norm(c1 - c2) >= 100.0:
            return c1, c2


def _paint(
    canvas: np.ndarray,
    foot: np.ndarray,
    texture: Texture,
    rng: np.random.Generator,
    y: np.ndarray,
    x: np.ndarray,
) -> None:
    """Fill ``foot`` with the texture mixing one random colour pair; work only inside its bounding box."""
    c1, c2 = _colour_pair(rng)
    rows, cols = np.flatnonzero(foot.any(axis=1)), np.flatnonzero(foot.any(axis=0))
    if rows.size == 0:
        return
    r0, r1, q0, q1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    t = texture(y[r0:r1], x[:, q0:q1])
    np.copyto(canvas[r0:r1, q0:q1], c1 + t[..., None] * (c2 - c1), where=foot[r0:r1, q0:q1, None])


# ---------------------------------------------------------------------------------------------------
# Shapes: footprints drawn with cv2 at 1/16-pixel precision (shift=4).

_SHIFT = 4
_ONE = 1 << _SHIFT


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * _ONE).astype(np.int32)


def _polygon(height: int, width: int, points: np.ndarray) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [_fixed(points)], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)


def _ellipse(height: int, width: int, centre, axes, angle_deg: float, thickness: int = -1) -> np.ndarray:
    canvas = np.zeros((height, width), np.uint8)
    c = tuple(int(v) for v in _fixed(np.asarray(centre)))
    a = tuple(int(v) for v in _fixed(np.asarray(axes)))
    cv2.ellipse(canvas, c, a, angle_deg, 0, 360, 1, thickness=thickness, lineType=cv2.LINE_8, shift=_SHIFT)
    return canvas.astype(bool)


def _rectangle(height: int, width: int, centre, length: float, breadth: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float32) * (length / 2, breadth / 2)
    rot = np.array([[c, -s], [s, c]], np.float32)
    return _polygon(height, width, half @ rot.T + np.asarray(centre, np.float32))


# ---------------------------------------------------------------------------------------------------
# One object per class: (rng, height, width, centre (cx, cy), scale) -> (footprint, texture).


def _disc(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    r = rng.uniform(12.0, 24.0) * scale
    foot = _ellipse(h, w, centre, (r, r * rng.uniform(0.7, 1.0)), rng.uniform(0.0, 180.0))
    angle, period, phase = rng.uniform(-0.2, 0.2), rng.uniform(5.0, 7.0) * scale, rng.random()
    return foot, partial(dots, angle=angle, period=period, phase=phase)


def _box(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    length, breadth = rng.uniform(22.0, 46.0) * scale, rng.uniform(18.0, 36.0) * scale
    foot = _rectangle(h, w, centre, length, breadth, rng.uniform(0.0, math.pi))
    angle, period, phase = rng.uniform(-0.2, 0.2), rng.uniform(8.0, 12.0) * scale, rng.uniform(0, 2 * math.pi)
    return foot, partial(checkerboard, angle=angle, period=period, phase=phase)


def _triangle(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    angles = rng.uniform(0.0, 2 * math.pi) + np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.35, 0.35, 3)
    radii = rng.uniform(18.0, 30.0, 3) * scale
    points = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1) + np.asarray(centre)
    angle = math.pi / 2 + rng.uniform(-0.25, 0.25)  # stripes run horizontally
    period, phase = rng.uniform(5.0, 8.0) * scale, rng.uniform(0, 2 * math.pi)
    foot = _polygon(h, w, points.astype(np.float32))
    return foot, partial(stripes, angle=angle, period=period, phase=phase)


def _ring(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    thickness = max(3, int(round(rng.uniform(9.0, 14.0) * scale)))
    r = rng.uniform(16.0, 28.0) * scale
    axes = (r, r * rng.uniform(0.75, 1.0))
    foot = _ellipse(h, w, centre, axes, rng.uniform(0.0, 180.0), thickness=thickness)
    angle = rng.uniform(-0.25, 0.25)  # stripes run vertically
    period, phase = rng.uniform(5.0, 8.0) * scale, rng.uniform(0, 2 * math.pi)
    return foot, partial(stripes, angle=angle, period=period, phase=phase)


def _bar(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    length, breadth = rng.uniform(50.0, 100.0) * scale, rng.uniform(12.0, 18.0) * scale
    foot = _rectangle(h, w, centre, length, breadth, rng.uniform(0.0, math.pi))
    cell = max(2.0, 3.0 * scale)
    return foot, lambda y, x: value_noise(rng, y.shape[0], x.shape[1], cell)


def _beacon(rng, h, w, centre, scale) -> tuple[np.ndarray, Texture]:
    r = rng.uniform(9.0, 13.0) * scale
    foot = _ellipse(h, w, centre, (r, r), 0.0)
    angle = math.pi / 4 + rng.uniform(-0.2, 0.2)
    period, phase = rng.uniform(3.5, 4.5) * scale, rng.uniform(0, 2 * math.pi)
    return foot, partial(stripes, angle=angle, period=period, phase=phase)


ObjectFn = Callable[[np.random.Generator, int, int, tuple[float, float], float], tuple[np.ndarray, Texture]]
OBJECTS: dict[int, ObjectFn] = {
    DISC: _disc,
    BOX: _box,
    TRIANGLE: _triangle,
    RING: _ring,
    BAR: _bar,
    BEACON: _beacon,
}


# ---------------------------------------------------------------------------------------------------
# Whole scenes.


def _illuminate(img: np.ndarray, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Global gain, a linear light ramp across the image and a mild colour cast."""
    h, w = img.shape[:2]
    gain = rng.uniform(0.75, 1.2)
    ramp_dir = rng.uniform(0, 2 * math.pi)
    u = (x - w / 2) * math.cos(ramp_dir) + (y - h / 2) * math.sin(ramp_dir)
    ramp = 1.0 + rng.uniform(0.0, 0.25) * u / (0.5 * max(h, w))
    cast = rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    return img * (gain * ramp)[..., None] * cast


def render_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    """Draw one scene from ``rng``: image uint8 (H, W, 3), mask int64 (H, W) and the drawn layers."""
    h, w = config.height, config.width
    scale = min(h, w) / REFERENCE_SIDE
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]

    img = np.empty((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.int64)
    cell = rng.uniform(16.0, 32.0) * scale
    _paint(img, np.ones((h, w), bool), lambda yy, xx: value_noise(rng, h, w, cell), rng, y, x)

    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    classes = [int(c) for c in rng.choice(COMMON_CLASSES, size=count)]
    layers: list[Layer] = []
    for cls in classes:
        # Centres may lie near the border: objects cut by the frame are part of the task.
        centre = (rng.uniform(0.0, w), rng.uniform(0.0, h))
        foot, texture = OBJECTS[cls](rng, h, w, centre, scale)
        _paint(img, foot, texture, rng, y, x)
        mask[foot] = cls
        layers.append((cls, foot))
    beacons = 1 + int(rng.integers(0, 3)) if rng.random() < config.rare_prob else 0
    for _ in range(beacons):
        # Beacons go on top and fully inside the frame, so "present" means visible.
        margin = 14.0 * scale
        centre = (rng.uniform(margin, w - margin), rng.uniform(margin, h - margin))
        foot, texture = _beacon(rng, h, w, centre, scale)
        _paint(img, foot, texture, rng, y, x)
        mask[foot] = BEACON
        layers.append((BEACON, foot))

    img = _illuminate(img, rng, y, x)
    sigma = rng.uniform(0.3, config.max_blur_sigma) * max(scale, 0.5)
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(config.noise_std)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Scene(image=image, mask=mask, layers=tuple(layers))


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``split``: independent of every other sample and split."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, SPLIT_IDS[split], index])))


# ---------------------------------------------------------------------------------------------------
# The dataset.


def _parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, str):  # "96" or "96x128", as data-spec strings deliver it
        parts = size.lower().split("x")
        try:
            dims = [int(p) for p in parts] * (2 if len(parts) == 1 else 1)
        except ValueError:
            raise UserError(f"size={size!r}: expected an int or 'HxW' such as '96x128'") from None
    elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        dims = [int(size)] * 2
    elif isinstance(size, Sequence) and all(isinstance(s, (int, np.integer)) for s in size):
        dims = [int(s) for s in size]
    else:
        raise UserError(f"size={size!r}: expected an int or (H, W) pair of ints")
    if len(dims) != 2 or min(dims) < MIN_SIZE or max(dims) > MAX_SIZE:
        raise UserError(f"size={size!r}: expected an int or (H, W) pair, each in {MIN_SIZE}..{MAX_SIZE}")
    return dims[0], dims[1]


def _as_int(name: str, value: object, low: int) -> int:
    """An int option (spec strings may deliver it as text) that is at least ``low``."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = int(value.strip())
        except ValueError:
            parsed = None
    if isinstance(parsed, bool) or not isinstance(parsed, (int, np.integer)) or parsed < low:
        raise UserError(f"{name}={value!r}: expected an integer >= {low}")
    return int(parsed)


def _as_float(name: str, value: object, low: float, high: float) -> float:
    try:
        parsed = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        parsed = math.nan
    if isinstance(value, bool) or not low <= parsed <= high:
        raise UserError(f"{name}={value!r}: expected a number in [{low:g}, {high:g}]")
    return parsed


def _as_bool(name: str, value: object) -> bool:
    text = str(value).strip().lower()
    if isinstance(value, bool) or text in ("0", "1", "true", "false", "yes", "no"):
        return text in ("1", "true", "yes")
    raise UserError(f"{name}={value!r}: expected true or false")


def _copy(sample: Sample) -> Sample:
    # Callers may transform tensors in place; the cached originals must not change.
    return {"image": sample["image"].clone(), "mask": sample["mask"].clone(), "path": sample["path"]}


class SyntheticDataset:
    """Procedural scenes with 7 classes (see module docstring); map-style, generated on the fly.

    ``cache=True`` keeps generated samples in memory (about 11 bytes per pixel), worthwhile when a
    small split is read for many epochs.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        num_images: int | None = None,
        size: int | str | Sequence[int] = 128,
        seed: int = 0,
        min_objects: int = 4,
        max_objects: int = 8,
        rare_prob: float = 0.2,
        noise_std: float = 4.0,
        cache: bool = False,
    ) -> None:
        if not isinstance(split, str) or split not in SPLIT_IDS:
            raise UserError(f"split={split!r}: expected one of {', '.join(SPLIT_IDS)}")
        height, width = _parse_size(size)
        self.split = split
        default_count = DEFAULT_NUM_IMAGES[split]
        self.num_images = default_count if num_images is None else _as_int("num_images", num_images, 1)
        self.seed = _as_int("seed", seed, 0)
        min_objects = _as_int("min_objects", min_objects, 0)
        max_objects = _as_int("max_objects", max_objects, max(min_objects, 1))
        self.config = SceneConfig(
            height=height,
            width=width,
            min_objects=min_objects,
            max_objects=max_objects,
            rare_prob=_as_float("rare_prob", rare_prob, 0.0, 1.0),
            noise_std=_as_float("noise_std", noise_std, 0.0, 64.0),
        )
        self.classes = ClassInfo(names=CLASS_NAMES, palette=PALETTE)
        self._cache: dict[int, Sample] | None = {} if _as_bool("cache", cache) else None

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Sample:
        index = operator.index(index)
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} {self.split} scenes")
        index %= self.num_images
        if self._cache is not None and index in self._cache:
            return _copy(self._cache[index])
        scene = render_scene(scene_rng(self.seed, self.split, index), self.config)
        sample: Sample = {
            "image": torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(scene.mask),
            "path": f"synthetic/{self.split}/{index:06d}",
        }
        if self._cache is not None:
            self._cache[index] = _copy(sample)
        return sample
