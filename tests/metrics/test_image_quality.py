"""Image-quality measures against scikit-image (PSNR, SSIM), scipy/NumPy hand computations and known
invariants (noise of a known level, grey images, blur lowers sharpness)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from trustseg.errors import UserError
from trustseg.metrics.image_quality import (
    ImageQuality,
    colourfulness,
    luminance,
    noise_level,
    psnr,
    rms_contrast,
    sharpness,
    ssim,
)


def pair(seed=0, shape=(3, 3, 40, 37), noise=20.0):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    noisy = (clean.double() + noise * torch.randn(shape, generator=generator, dtype=torch.float64)).clamp(0, 255)
    return clean, noisy.round().to(torch.uint8)


def gray(images):
    """The BT.601 luma, computed here with NumPy."""
    rgb = images.double().numpy()
    return 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]


def test_psnr_and_ssim_match_scikit_image():
    clean, noisy = pair()
    ours_psnr, ours_ssim = psnr(noisy, clean), ssim(noisy, clean)
    gray_clean, gray_noisy = gray(clean), gray(noisy)
    for i in range(3):
        expected_psnr = peak_signal_noise_ratio(clean[i].numpy(), noisy[i].numpy(), data_range=255)
        expected_ssim = structural_similarity(gray_noisy[i], gray_clean[i], gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=255)
        assert ours_psnr[i].item() == pytest.approx(expected_psnr, abs=1e-9)
        assert ours_ssim[i].item() == pytest.approx(expected_ssim, abs=1e-9)
    assert torch.isinf(psnr(clean, clean)).all() and torch.allclose(ssim(clean, clean), torch.ones(3, dtype=torch.float64))


def test_noise_estimate_recovers_a_known_level_and_matches_a_scipy_convolution():
    generator = torch.Generator().manual_seed(1)
    flat = torch.full((1, 3, 256, 256), 128.0, dtype=torch.float64)
    for sigma in (5.0, 15.0):
        noisy = flat + sigma * torch.randn(1, 1, 256, 256, generator=generator, dtype=torch.float64)
        assert noise_level(noisy).item() == pytest.approx(sigma, rel=0.05)
    _, images = pair(2)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=float)
    for i, y in enumerate(gray(images)):
        response = ndimage.convolve(y, kernel)[1:-1, 1:-1]  # symmetric kernel: convolution = correlation
        expected = math.sqrt(math.pi / 2) * np.abs(response).sum() / (6 * (y.shape[1] - 2) * (y.shape[0] - 2))
        assert noise_level(images)[i].item() == pytest.approx(expected, rel=1e-12)


def test_sharpness_contrast_and_colourfulness_by_hand():
    _, images = pair(3)
    luma = gray(images)
    rgb = images.double().numpy()
    for i in range(3):
        assert sharpness(images)[i].item() == pytest.approx(ndimage.laplace(luma[i])[1:-1, 1:-1].var(), rel=1e-12)
        assert rms_contrast(images)[i].item() == pytest.approx((luma[i] / 255).std(), rel=1e-12)
        rg, yb = rgb[i, 0] - rgb[i, 1], (rgb[i, 0] + rgb[i, 1]) / 2 - rgb[i, 2]
        expected = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
        assert colourfulness(images)[i].item() == pytest.approx(expected, rel=1e-12)
    grey = images[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(colourfulness(grey), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(luminance(grey)[:, 0], grey[:, 0].double())


def test_blur_lowers_sharpness_and_noise_raises_the_noise_estimate():
    clean, noisy = pair(4, shape=(2, 3, 48, 48), noise=25.0)
    blurred = torch.nn.functional.avg_pool2d(clean.double(), 5, stride=1, padding=2, count_include_pad=False)
    assert (sharpness(blurred) < sharpness(clean)).all()
    smooth = blurred
    assert (noise_level(smooth + 0) < noise_level(smooth + 25 * torch.randn_like(smooth))).all()


def test_streaming_means_do_not_depend_on_batching():
    clean, noisy = pair(5, shape=(5, 3, 32, 32))
    whole, split = ImageQuality(), ImageQuality()
    whole.update(noisy, clean)
    split.update(noisy[:2], clean[:2])
    split.update(noisy[2:], clean[2:])
    split.update(noisy[:1, :, :20], clean[:1])  # sizes differ: only the no-reference measures count it
    means, streamed = whole.compute(), split.compute()
    assert means["PSNR"] == pytest.approx(psnr(noisy, clean).mean().item(), rel=1e-12)
    assert means["SSIM"] == pytest.approx(ssim(noisy, clean).mean().item(), rel=1e-12)
    assert streamed["PSNR"] == pytest.approx(means["PSNR"], rel=1e-12)
    with_extra = torch.cat([noise_level(noisy), noise_level(noisy[:1, :, :20])]).mean().item()
    assert streamed["noise"] == pytest.approx(with_extra, rel=1e-12)
    assert math.isnan(ImageQuality().compute()["SSIM"])


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="RGB"):
        sharpness(torch.zeros(1, 1, 8, 8))
    with pytest.raises(UserError, match="SSIM"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
