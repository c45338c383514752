"""Blur corruptions and their shared primitives against the reference ``imagecorruptions`` package.

Oracle: ``imagecorruptions.corrupt`` (uint8 in, truncated uint8 out). Deterministic corruptions must
agree within 1 grey level of 255 everywhere (truncation turns float-rounding differences at exact
integers into 1-level steps) and on almost every pixel exactly; glass blur, whose sequential swaps
cannot be replayed, is compared by its PSNR and SSIM to the clean image over seeds.
"""


import numpy as np
import pytest
import torch

from trustseg.robustness.corruptions import blur, corrupt, ops

imagecorruptions = pytest.importorskip("imagecorruptions")
reference = pytest.importorskip("imagecorruptions.corruptions")
metrics = pytest.importorskip("skimage.metrics")

pytestmark = pytest.mark.usefixtures("one_thread")  # small images: a second thread only adds OpenMP waits

SIZES = ((120, 160), (97, 131))


def ours(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    batch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    out, _ = corrupt(batch, name, severity, torch.Generator().manual_seed(seed))
    return out[0].permute(1, 2, 0).numpy()


def assert_close_uint8(got: np.ndarray, want: np.ndarray, exact_fraction: float = 0.95) -> None:
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1, f"max |diff| {diff.max()} grey levels"
    assert (diff == 0).mean() >= exact_fraction, f"only {(diff == 0).mean():.3f} of values equal"


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "zoom_blur"])
def test_deterministic_blurs_match_reference(photo, name, size, backend):
    image = np.ascontiguousarray(photo[:size[0], :size[1]])
    with ops.use_backend(backend):
        for severity in range(1, 6):
            assert_close_uint8(ours(image, name, severity), imagecorruptions.corrupt(image, severity, name))


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (40, 203)])
def test_clipped_zoom_matches_reference(size):
    image = np.random.default_rng(0).random((*size, 3)).astype(np.float32)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    for factor in (1.0, 1.03, 1.11, 1.2, 1.3, 2.0, 2.5, 4.5):
        want = reference.clipped_zoom(image, factor)[:size[0], :size[1]]
        got = ops.clipped_zoom(batch, factor)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"factor {factor}")


def test_clipped_zoom_keeps_scipys_dark_edge():
    # 64 columns zoomed 2.5x: the last sample lands at 63.00000000000001, outside, so scipy writes 0.
    image = np.full((120, 160, 3), 0.5, np.float32)
    want = reference.clipped_zoom(image, 2.5)[:120, :160]
    got = ops.clipped_zoom(torch.from_numpy(image).permute(2, 0, 1)[None], 2.5)[0].permute(1, 2, 0).numpy()
    assert want[:, -1].max() == 0 and got[:, -1].max() == 0
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("angle", [-45.0, -30.0, 0.0, 12.3, 30.0, 45.0, 60.0, 90.0, -100.0])
def test_motion_blur_primitive_matches_reference(photo, angle):
    image = photo[:97, :131].astype(np.float32) / 255
    batch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    for radius, sigma in blur.MOTION:
        want = reference._motion_blur(image, radius, sigma, angle)
        got = ops.motion_blur(batch, radius, sigma, torch.tensor([angle], dtype=torch.float64))
        np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, atol=1e-5)


def test_motion_blur_stops_when_the_shift_leaves_the_image():
    image = np.random.default_rng(1).random((12, 40, 3)).astype(np.float32)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None]
    want = reference._motion_blur(image, 20, 15, 80.0)
    got = ops.motion_blur(batch, 20, 15, torch.tensor([80.0], dtype=torch.float64))
    np.testing.assert_allclose(got[0].permute(1, 2, 0).numpy(), want, atol=1e-5)


def test_motion_blur_corruption_uses_the_drawn_angle(photo):
    image = np.ascontiguousarray(photo[:120, :160])
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    for severity, (radius, sigma) in enumerate(blur.MOTION, 1):
        angle = float(ops.uniform(torch.Generator().manual_seed(severity), -45, 45))
        assert -45 <= angle < 45
        want = np.uint8(np.clip(reference._motion_blur(image, radius, sigma, angle), 0, 255))
        assert_close_uint8(ours(image, "motion_blur", severity, seed=severity), want)
        got = blur.motion_blur(batch, severity, torch.Generator().manual_seed(severity))
        assert got.shape == batch.shape


def test_glass_blur_matches_reference_statistics(photo, photo_is_camvid):
    image = np.ascontiguousarray(photo[:120, :160])
    seeds = range(2)
    for severity in range(1, 6):
        stats = []
        for corrupted in ([np.uint8(reference.glass_blur(image, severity, seed=s)) for s in seeds],
                          [ours(image, "glass_blur", severity, seed=s) for s in seeds]):
            stats.append(np.mean([(metrics.peak_signal_noise_ratio(image, c),
                                   metrics.structural_similarity(image, c, channel_axis=2)) for c in corrupted], 0))
        (ref_psnr, ref_ssim), (our_psnr, our_ssim) = stats
        # Independent offsets vs. the reference's chained swaps. Measured on the CamVid photo: at most
        # 3.54% (SSIM, severity 1; PSNR at most 3.3%, severity 3); up to 8% (PSNR, severity 3) on the
        # synthetic fallback scene, whose flat textures and sharp edges make PSNR more sensitive to the
        # chains' correlated displacements. The real photo is held to its own, tighter figure.
        tolerance = 0.036 if photo_is_camvid else 0.1
        assert our_psnr == pytest.approx(ref_psnr, rel=tolerance), severity
        assert our_ssim == pytest.approx(ref_ssim, rel=tolerance), severity


def test_glass_displacement_table_is_the_swap_process():
    # One swap pass with offsets in {-1, 0}^2 carries pixels along chains: far more spread than one step.
    table, cdf = blur.glass_displacements(1, 1)
    probability = torch.diff(cdf, prepend=torch.zeros(1, dtype=cdf.dtype))
    assert cdf[-1] == pytest.approx(1.0)
    variance = (table.double() ** 2 * probability[:, None]).sum(0) - ((table.double() * probability[:, None]).sum(0)) ** 2
    assert (variance > 0.5).all()


@pytest.mark.parametrize("name", ["glass_blur", "motion_blur", "gaussian_blur", "defocus_blur", "zoom_blur"])
def test_seeded_and_batch_independent(name):
    images = torch.rand(3, 3, 40, 56)
    fn = getattr(blur, name)
    once = fn(images, 3, torch.Generator().manual_seed(7))
    again = fn(images, 3, torch.Generator().manual_seed(7))
    assert torch.equal(once, again)
    assert once.shape == images.shape and once.min() >= 0 and once.max() <= 1
    batch = fn(images, 3, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    alone = fn(images[1:2], 3, [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:2], alone, atol=1e-6, rtol=0)



def test_glass_sampler_picks_what_searchsorted_picks():
    table, cdf = blur.glass_displacements(4, 2)
    generator = torch.Generator().manual_seed(5)
    sources = blur.glass_sources(generator, 50, 60, 4, 2)
    u = torch.rand(50 * 60, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    offsets = table[torch.searchsorted(cdf, u, right=True).clamp(max=len(table) - 1)]
    rows = (torch.arange(50).repeat_interleave(60) + offsets[:, 0]).clamp(0, 49)
    cols = (torch.arange(60).repeat(50) + offsets[:, 1]).clamp(0, 59)
    assert torch.equal(sources, rows * 60 + cols)
