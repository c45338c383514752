"""The corruptions on every device: the torch backend (what tensors off the CPU run) against the OpenCV
backend (the CPU default) on CPU tensors, and CUDA against the CPU where a GPU is present.

Both runs get the same per-image generators, so their random draws are identical; what may differ is
float rounding in the filters (OpenCV accumulates in float32, the torch backend in float64). Measured on
64 x 96 crops of the test photograph, all severities: float outputs within 6e-7 (but for glass blur, where
a flip of its inner 8-bit step moves a value by up to 3e-4); uint8 outputs within one
level, at up to 1.2% of values for defocus blur (its severity-1 kernel is a disk of 29 equal weights, so
one output in 29 is an exact integer level that rounding may put on either side of the truncation) and
at most 0.05% for the other filtered corruptions. The rest do not filter and agree bit for bit.
"""

import numpy as np
import pytest
import torch

from trustseg.robustness.corruptions import CORRUPTIONS, DISPLACEMENTS, SEVERITIES, corrupt, ops

pytestmark = pytest.mark.usefixtures("one_thread")  # small images: a second thread only adds OpenMP waits

# Corruptions that call the filters, where the backends round differently; the others must be identical.
FILTERED = ("defocus_blur", "glass_blur", "gaussian_blur", "elastic_transform", "spatter", "frost")
# Share of uint8 values allowed to differ by one level (about twice the largest measured, see above).
LEVEL_FLIPS = {"defocus_blur": 0.025}
LEVEL_FLIPS_DEFAULT = 0.002
# Float outputs, for the filtered corruptions without an 8-bit step inside (glass blur quantises between
# its two blurs, spatter's water highlights are computed on 8-bit layers).
FLOAT_ATOL = 1e-6
QUANTISE_INSIDE = ("glass_blur", "spatter")


@pytest.fixture(scope="module")
def batch(photo):
    """Two 64 x 96 crops of the test photograph, uint8 (2, 3, 64, 96), and label maps (2, 64, 96)."""
    crops = [np.ascontiguousarray(photo[y:y + 64, x:x + 96]) for y, x in ((0, 0), (150, 200))]
    images = torch.stack([torch.from_numpy(crop).permute(2, 0, 1) for crop in crops])
    masks = torch.randint(0, 11, (2, 64, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return images, masks


def generators():
    return [torch.Generator().manual_seed(seed) for seed in (11, 12)]


def assert_levels_agree(got: torch.Tensor, want: torch.Tensor, name: str, severity: int) -> None:
    diff = (got.cpu().int() - want.cpu().int()).abs()
    flips = (diff > 0).float().mean().item()
    assert diff.max() <= 1, f"{name} severity {severity}: values differ by {diff.max()} levels"
    limit = LEVEL_FLIPS.get(name, LEVEL_FLIPS_DEFAULT)
    assert flips <= limit, f"{name} severity {severity}: {flips:.4f} of values differ, more than {limit}"


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_torch_backend_agrees_with_opencv_backend(batch, name):
    images, masks = batch
    for severity in SEVERITIES:
        with ops.use_backend("opencv"):
            want, want_masks = corrupt(images, name, severity, generators(), masks)
            want_float = CORRUPTIONS[name](images.float() / 255, severity, generators())
        with ops.use_backend("torch"):
            got, got_masks = corrupt(images, name, severity, generators(), masks)
            got_float = CORRUPTIONS[name](images.float() / 255, severity, generators())
        if name not in FILTERED:
            assert torch.equal(got, want), f"{name} severity {severity}: no filter, yet the backends differ"
            assert torch.equal(got_float, want_float)
            continue
        assert_levels_agree(got, want, name, severity)
        if name not in QUANTISE_INSIDE:
            torch.testing.assert_close(got_float, want_float, rtol=0, atol=FLOAT_ATOL)
        if name in DISPLACEMENTS:
            # Nearest-neighbour labels move identically unless a displacement sits within rounding of .5.
            assert (got_masks != want_masks).float().mean() <= LEVEL_FLIPS_DEFAULT


def test_torch_backend_reads_host_memory_only_where_documented(batch, monkeypatch):
    """On the torch backend, NumPy (and so OpenCV and Pillow) sees image data only in the steps whose
    docstrings say they run on the CPU: JPEG coding and spatter's water highlights (and glass blur's
    displacement table, a constant built once per severity). Anything else would copy every batch off
    the GPU."""
    images, masks = batch
    readers: set[str] = set()
    numpy = torch.Tensor.numpy

    def spy(self, *args, **kwargs):
        import inspect

        readers.add(inspect.stack()[1].function)
        return numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", spy)
    with ops.use_backend("torch"):
        for name in CORRUPTIONS:
            corrupt(images, name, 1, generators(), masks)
            corrupt(images, name, 5, generators(), masks)
    assert readers <= {"_per_image_hwc", "spatter_from_noise", "glass_displacements"}, readers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_cuda_agrees_with_cpu(batch, name):
    """CUDA against the CPU's default (OpenCV) run. Besides the filters, GPU kernels may round elementwise
    arithmetic differently (fused multiply-adds), so an output level may differ by one wherever the exact
    result is a whole level; away from such ties the levels must be equal. Glass blur and spatter
    quantise inside, where a tie's flip is carried on: those are held to the share bound instead."""
    images, masks = batch
    for severity in SEVERITIES:
        want, want_masks = corrupt(images, name, severity, generators(), masks)
        got, got_masks = corrupt(images.cuda(), name, severity, generators(), masks.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.uint8 and got.shape == images.shape
        got = got.cpu()
        assert (got.int() - want.int()).abs().max() <= 1, f"{name} severity {severity}"
        if name in QUANTISE_INSIDE:
            assert_levels_agree(got, want, name, severity)
        else:
            levels = CORRUPTIONS[name](images.float() / 255, severity, generators()).clamp_(0, 1).mul_(255)
            distance = (levels - levels.round()).abs()[got != want]
            assert (distance < 1e-3).all(), f"{name} severity {severity}: levels differ away from a tie"
        if name in DISPLACEMENTS:
            assert got_masks.device.type == "cuda"
            assert (got_masks.cpu() != want_masks).float().mean() <= LEVEL_FLIPS_DEFAULT
        floats = CORRUPTIONS[name](images.cuda().float() / 255, severity, generators())
        assert floats.device.type == "cuda"
