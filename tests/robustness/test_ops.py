"""Shared corruption primitives against scipy.ndimage, the library the reference's filters come from, on both
filter backends (OpenCV, the CPU default, and torch, what other devices run)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from trustseg.robustness.corruptions import ops

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("nearest", "reflect", "mirror")


@pytest.fixture(params=ops.BACKENDS)
def backend(request):
    with ops.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(67, 131), (3, 40), (1, 9)])  # the small ones: kernels wider than the image
def test_gaussian_filter_equals_scipy(backend, mode, size):
    x = np.random.default_rng(0).random((2, 3, *size)).astype(np.float32)
    for sigma, truncate in ((0.7, 4.0), (6.0, 4.0), ((5.12, 10.24), 3.0), ((0.0, 2.0), 4.0)):
        sigmas = (0, 0, *sigma) if isinstance(sigma, tuple) else (0, 0, sigma, sigma)
        want = ndimage.gaussian_filter(x.astype(np.float64), sigmas, mode=mode, truncate=truncate)
        got = ops.gaussian_filter(torch.from_numpy(x), sigma, mode=mode, truncate=truncate)
        assert got.dtype == torch.float32 and got.shape == x.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6, err_msg=f"{sigma} {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_filter1d_equals_scipy_correlate1d_in_float64(backend, mode):
    x = np.random.default_rng(1).random((4, 17, 23))
    taps = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1], dtype=torch.float64)
    for dim, axis in ((-1, 2), (-2, 1)):
        want = ndimage.correlate1d(x, taps.numpy(), axis=axis, mode=mode)
        got = ops.filter1d(torch.from_numpy(x), taps, dim, mode)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_correlate2d_equals_scipy_correlate(backend, mode):
    x = np.random.default_rng(2).random((3, 41, 57)).astype(np.float32)
    kernel = np.random.default_rng(3).random((15, 15))
    kernel /= kernel.sum()
    want = ndimage.correlate(x.astype(np.float64), kernel[None], mode=mode)
    got = ops.correlate2d(torch.from_numpy(x), torch.from_numpy(kernel), mode)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)


def test_filters_reject_unknown_modes(backend):
    with pytest.raises(ValueError, match="wrap"):
        ops.gaussian_filter(torch.rand(1, 8, 8), 1.0, mode="wrap")


def test_planes_filtered_in_parallel_threads_give_the_same_result():
    x = torch.rand(4, 3, 40, 50)
    alone = ops.gaussian_filter(x, 2.0, mode="reflect")
    torch.set_num_threads(2)  # the one_thread fixture restores it
    torch.testing.assert_close(ops.gaussian_filter(x, 2.0, mode="reflect"), alone, atol=0, rtol=0)


def test_backend_follows_the_device_unless_overridden():
    assert ops.backend(torch.zeros(1)) == "opencv"
    assert ops.backend(torch.zeros(1, device="meta")) == "torch"
    with ops.use_backend("torch"):
        assert ops.backend(torch.zeros(1)) == "torch"
        torch.set_num_threads(2)  # a pool of two threads; the one_thread fixture restores it
        seen = []
        ops.parallel_map(lambda i: seen.append(ops.backend(torch.zeros(1))), 4)
        assert seen == ["torch"] * 4, "pool threads inherit the override"
    assert ops.backend(torch.zeros(1)) == "opencv"
    with pytest.raises(ValueError, match="cuda"):
        with ops.use_backend("cuda"):
            pass
