"""Noise corruptions against the reference ``imagecorruptions`` package, in distribution.

The noise is random, so outputs are compared statistically over several seeds at every severity, on
a real image (the first CamVid validation image when the data is present, a synthetic scene otherwise)
cropped to 120x160 and to the odd size 97x131. Measured agreement with 10 seeds, worst severity:
residual (output - clean) std within 0.7%, residual mean within 0.14 grey levels, rates of 0 and 255
(where above 0.5%) within 2.1% relative; shot-noise residual variance per intensity third within 1.1%.
"""


import numpy as np
import pytest
import torch

from trustseg.robustness.corruptions import corrupt
from trustseg.robustness.corruptions.noise import (IMPULSE_AMOUNT, SHOT_RATE, gaussian_noise, impulse_noise,
                                                   shot_noise, speckle_noise)
from trustseg.robustness.corruptions.ops import random_bits

imagecorruptions = pytest.importorskip("imagecorruptions")
stats = pytest.importorskip("scipy.stats")
pytestmark = pytest.mark.usefixtures("one_thread")  # small images: a second thread only adds OpenMP waits

SIZES = ((120, 160), (97, 131))
SEEDS = range(10)
NOISES = {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
          "speckle_noise": speckle_noise}


def ours(clean: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    x = torch.from_numpy(clean).permute(2, 0, 1)[None].contiguous()
    return corrupt(x, name, severity, [torch.Generator().manual_seed(seed)])[0][0].permute(1, 2, 0).numpy()


def reference(clean: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    np.random.seed(seed)
    return imagecorruptions.corrupt(clean, severity, name)


_OUTPUTS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def outputs(photo: np.ndarray, name: str, severity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ours, reference, clean) pooled over seeds and both sizes, flat float64; computed once per module."""
    if (name, severity) in _OUTPUTS:
        return _OUTPUTS[name, severity]
    mine, theirs, clean = [], [], []
    for h, w in SIZES:
        crop = np.ascontiguousarray(photo[:h, :w])
        for seed in SEEDS:
            mine.append(ours(crop, name, severity, seed).ravel())
            theirs.append(reference(crop, name, severity, seed).ravel())
            clean.append(crop.ravel())
    _OUTPUTS[name, severity] = tuple(np.concatenate(a).astype(np.float64) for a in (mine, theirs, clean))
    return _OUTPUTS[name, severity]


@pytest.mark.parametrize("name", list(NOISES))
def test_noise_matches_the_reference_in_distribution_at_every_severity(photo, name):
    for severity in range(1, 6):
        mine, theirs, clean = outputs(photo, name, severity)
        r_mine, r_theirs = mine - clean, theirs - clean
        context = f"{name} severity {severity}"
        assert abs(r_mine.std() / r_theirs.std() - 1) < 0.02, context
        assert abs(r_mine.mean() - r_theirs.mean()) < 0.02 * r_theirs.std() + 0.2, context
        for value in (0, 255):
            rate_mine, rate_theirs = (mine == value).mean(), (theirs == value).mean()
            assert abs(rate_mine - rate_theirs) < 0.1 * rate_theirs + 0.001, f"{context}: rate of {value}"


def test_shot_noise_variance_follows_intensity_like_the_reference(photo):
    """Poisson noise: the residual variance grows with intensity; compared per third of the intensities."""
    for severity in range(1, 6):
        mine, theirs, clean = outputs(photo, "shot_noise", severity)
        low_third, high_third = np.quantile(clean, [1 / 3, 2 / 3])
        for low, high in ((0, low_third), (low_third, high_third), (high_third, 256)):
            band = (clean >= low) & (clean < high)
            ratio = (mine - clean)[band].var() / (theirs - clean)[band].var()
            assert abs(ratio - 1) < 0.05, f"severity {severity}, intensities {low}-{high}: variance ratio {ratio}"


@pytest.mark.parametrize("quantised", [True, False])
def test_shot_noise_counts_are_poisson(quantised):
    """Counts rate * output are Poisson(rate * x) saturated at rate, on the fast 8-bit path and on the
    torch.poisson path taken by inputs that are not multiples of 1/255 (chi-square, p > 1e-4)."""
    generator = torch.Generator().manual_seed(0)
    for severity in (1, 3, 5):
        rate = SHOT_RATE[severity - 1]
        for level in (1, 40, 128, 255):
            intensity = level / 255 if quantised else (level - 0.5) / 255
            x = torch.full((1, 3, 100, 100), intensity)
            counts = torch.bincount((shot_noise(x, severity, generator) * rate).round().long().flatten(),
                                    minlength=rate + 1).numpy()
            lam = rate * intensity
            expected = np.append(stats.poisson.pmf(np.arange(rate), lam), stats.poisson.sf(rate - 1, lam))
            keep = expected * counts.sum() > 5
            pooled_counts = np.append(counts[keep], counts[~keep].sum())
            pooled_expected = np.append(expected[keep], expected[~keep].sum()) * counts.sum()
            nonempty = pooled_expected > 0
            p = stats.chisquare(pooled_counts[nonempty], pooled_expected[nonempty]).pvalue
            assert p > 1e-4, f"severity {severity}, level {level}: p = {p}"


def test_shot_noise_takes_its_path_per_image():
    """A batch mixing 8-bit and other intensities: each image's noise is the same as alone."""
    x = torch.stack([torch.full((3, 20, 30), 100 / 255), torch.full((3, 20, 30), 0.4)])
    both = shot_noise(x, 3, [torch.Generator().manual_seed(s) for s in (1, 2)])
    for i in range(2):
        assert torch.equal(both[i:i + 1], shot_noise(x[i:i + 1], 3, [torch.Generator().manual_seed(i + 1)]))


def test_impulse_noise_flips_each_element_with_the_severity_amount_and_leaves_the_rest():
    x = torch.full((2, 3, 64, 80), 0.5)
    for severity, amount in enumerate(IMPULSE_AMOUNT, 1):
        y = impulse_noise(x, severity, torch.Generator().manual_seed(severity))
        salt, pepper = (y == 1).double().mean().item(), (y == 0).double().mean().item()
        assert abs(salt - amount / 2) < 0.1 * amount / 2 and abs(pepper - amount / 2) < 0.1 * amount / 2
        assert torch.all((y == 0) | (y == 1) | (y == 0.5))
        # Per element, not per pixel: the three channels of a pixel flip independently.
        flipped = (y != 0.5).double()
        both = (flipped[:, 0] * flipped[:, 1]).mean().item()
        assert abs(both - amount ** 2) < 0.25 * amount ** 2


def test_random_bits_are_uniform_31_bit_integers():
    bits = random_bits((3, 101, 77), torch.Generator().manual_seed(0))
    assert bits.dtype == torch.int32 and bits.shape == (3, 101, 77) and bits.is_contiguous()
    assert bits.min() >= 0 and bits.max() > 2 ** 31 - 2 ** 20
    ones = torch.stack([(bits >> k) & 1 for k in range(31)]).double().mean(dim=(1, 2, 3))
    assert torch.all((ones - 0.5).abs() < 0.01), "every bit must be a fair coin"
    rows = random_bits((2, 7), [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(rows[1:], random_bits((1, 7), torch.Generator().manual_seed(2)))
