"""Weather corruptions against the reference ``imagecorruptions`` package.

Given the same random draw (fractal, frost crop, noise field, streak angle) the deterministic part is
compared exactly with the reference's float output; the draws themselves are compared in
distribution: output mean, std and PSNR to the clean image, averaged over seeds at every severity, on a
real image (the first CamVid validation image when present, a synthetic scene otherwise) cropped to
120x160 and 97x131. Measured agreement of the averages (mean / std / PSNR), worst severity: fog 0.3% /
1.5% / 1.7% and frost 1.4% / 1.5% / 1.9% (100 seeds per size), spatter 0.4% / 0.5% / 0.8% and snow
0.3% / 0.6% / 0.7% (15 seeds per size); every difference under 1.3 standard errors.
"""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trustseg.robustness.corruptions import corrupt, ops
from trustseg.robustness.corruptions.weather import (FOG, FROST_PHOTOS, PROCEDURAL_FROST_MEAN, PROCEDURAL_FROST_STD,
                                                     SNOW, _frost_photo_dir, _rescaled_frost, fog, fog_from_fractal,
                                                     frost, frost_from_texture, frost_source, plasma_fractal,
                                                     procedural_frost, snow, snow_from_noise, spatter,
                                                     spatter_from_noise)

imagecorruptions = pytest.importorskip("imagecorruptions")
reference = imagecorruptions.corruptions
pytestmark = pytest.mark.usefixtures("one_thread")  # small images: a second thread only adds OpenMP waits

SIZES = ((120, 160), (97, 131))
WEATHER = {"fog": fog, "frost": frost, "spatter": spatter, "snow": snow}
# Seeds per size for the distribution test: fog and frost vary a lot from draw to draw.
SEEDS = {"fog": 100, "frost": 100, "spatter": 15, "snow": 15}


def crops(photo: np.ndarray):
    for h, w in SIZES:
        clean = np.ascontiguousarray(photo[:h, :w])
        yield clean, torch.from_numpy(clean).permute(2, 0, 1)[None].float() / 255


def as_255(x: torch.Tensor) -> np.ndarray:
    """Our float (1, 3, H, W) in [0, 1] as the reference's float (H, W, 3) in [0, 255]."""
    return x[0].permute(1, 2, 0).double().numpy() * 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255 ** 2 / ((a.astype(np.float64) - b) ** 2).mean())


@pytest.mark.parametrize("name", list(WEATHER))
def test_weather_matches_the_reference_in_distribution_at_every_severity(photo, name):
    for severity in range(1, 6):
        mine, theirs = [], []
        for k, (clean, _) in enumerate(crops(photo)):
            x = torch.from_numpy(clean).permute(2, 0, 1)[None].contiguous()
            for seed in range(1000 * k, 1000 * k + SEEDS[name]):
                np.random.seed(seed)
                ref = imagecorruptions.corrupt(clean, severity, name)
                out = corrupt(x, name, severity, [torch.Generator().manual_seed(seed)])[0][0].permute(1, 2, 0).numpy()
                theirs.append((ref.mean(), ref.std(), psnr(ref, clean)))
                mine.append((out.mean(), out.std(), psnr(out, clean)))
        for stat, a, b in zip(("mean", "std", "PSNR"), np.mean(mine, 0), np.mean(theirs, 0)):
            assert abs(a / b - 1) < 0.03, f"{name} severity {severity}: {stat} {a:.2f}, reference {b:.2f}"


def test_fog_equals_the_reference_given_the_same_fractal(photo, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    for clean, x in crops(photo):
        for severity in range(1, 6):
            fractal = plasma_fractal(1, 256, FOG[severity - 1][1], generator)
            monkeypatch.setattr(reference, "plasma_fractal", lambda mapsize, wibbledecay: fractal[0].numpy().copy())
            expected = reference.fog(Image.fromarray(clean), severity)
            got = as_255(fog_from_fractal(x, fractal[:, :clean.shape[0], :clean.shape[1]], severity))
            np.testing.assert_allclose(got, expected, atol=1e-3)


def test_plasma_fractal_statistics_match_the_reference():
    """Level, contrast and roughness (mean |horizontal step|) of 100 maps per decay, within 3 standard errors."""
    generator = torch.Generator().manual_seed(0)
    np.random.seed(0)
    for decay in sorted({d for _, d in FOG}):
        mine = plasma_fractal(100, 128, decay, generator).double().numpy()
        theirs = np.stack([reference.plasma_fractal(128, decay) for _ in range(100)])
        assert mine.min() == 0 and mine.max() == 1
        for stat in (lambda m: m.mean((1, 2)), lambda m: m.std((1, 2)),
                     lambda m: np.abs(np.diff(m, axis=2)).mean((1, 2))):
            a, b = stat(mine), stat(theirs)
            assert abs(a.mean() - b.mean()) < 3 * np.sqrt(a.var() / len(a) + b.var() / len(b)), decay


def test_frost_equals_the_reference_given_the_same_crop(photo):
    """The reference's draws replayed: photograph index, then crop row and column; our rescaled
    photograph (bicubic, cover x 1.1) and blend must give its output."""
    folder = _frost_photo_dir()
    assert folder is not None and frost_source() == "imagecorruptions"
    for clean, x in crops(photo):
        h, w = clean.shape[:2]
        for severity in range(1, 6):
            for seed in range(3):
                np.random.seed(seed)
                texture = _rescaled_frost(str(folder / FROST_PHOTOS[np.random.randint(6)]), h, w)
                top = np.random.randint(0, texture.shape[1] - h)
                left = np.random.randint(0, texture.shape[2] - w)
                np.random.seed(seed)
                expected = reference.frost(Image.fromarray(clean), severity)
                got = as_255(frost_from_texture(x, texture[None, :, top:top + h, left:left + w], severity))
                np.testing.assert_allclose(got, expected, atol=1e-3)


def test_frost_falls_back_to_a_procedural_texture_without_imagecorruptions(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)
    assert frost_source() == "procedural"
    texture = procedural_frost(4, 97, 131, torch.Generator().manual_seed(0))
    assert texture.shape == (4, 3, 97, 131) and 0 <= texture.min() and texture.max() <= 1
    assert torch.allclose(texture.mean(dim=(0, 2, 3)), torch.tensor(PROCEDURAL_FROST_MEAN), atol=0.02)
    assert abs(texture.std(dim=(2, 3)).mean().item() - PROCEDURAL_FROST_STD) < 0.02
    x = torch.rand(2, 3, 97, 131)
    a = frost(x, 3, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(a, frost(x, 3, [torch.Generator().manual_seed(s) for s in (1, 2)]))
    assert torch.equal(a[1:], frost(x[1:], 3, [torch.Generator().manual_seed(2)]))
    assert torch.equal(a, frost_from_texture(x, procedural_frost(2, 97, 131, [torch.Generator().manual_seed(s)
                                                                               for s in (1, 2)]), 3))


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_spatter_equals_the_reference_given_the_same_noise(photo, backend):
    """np.random.normal(loc, scale) is loc + scale * standard_normal from the same stream: replay it."""
    for clean, x in crops(photo):
        for severity in range(1, 6):
            for seed in range(2):
                np.random.seed(seed)
                noise = torch.from_numpy(np.random.standard_normal(clean.shape[:2])).float()[None]
                np.random.seed(seed)
                expected = reference.spatter(Image.fromarray(clean), severity)
                with ops.use_backend(backend):
                    got = as_255(spatter_from_noise(x, noise, severity))
                np.testing.assert_allclose(got, expected, atol=1e-3)


def test_snow_equals_the_reference_given_the_same_noise_and_angle(photo):
    """Exact except, for streaks falling from the right (angle > -90), the side bands where the
    reference reads columns of its zoomed layer past the image (see ``snow_from_noise``), and a few
    streak values that round to the other 8-bit level in float32 (1 grey level, < 0.1% of values)."""
    for clean, x in crops(photo):
        for severity in range(1, 6):
            band = 2 * SNOW[severity - 1][4] + 1
            for seed in range(4):
                np.random.seed(seed)
                noise = torch.from_numpy(np.random.standard_normal(clean.shape[:2])).float()[None, None]
                angle = np.random.uniform(-135, -45)
                np.random.seed(seed)
                expected = reference.snow(Image.fromarray(clean), severity)
                got = as_255(snow_from_noise(x, noise, torch.tensor([angle]), severity))
                if angle > -90:
                    got, expected = got[:, band:-band], expected[:, band:-band]
                error = np.abs(got - expected)
                assert (error > 1e-3).mean() < 1e-3 and error.max() < 2 + 1e-3, (severity, seed)
