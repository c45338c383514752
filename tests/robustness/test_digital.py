"""Digital corruptions against their oracle, the ``imagecorruptions`` package (Hendrycks & Dietterich, 2019).

Deterministic corruptions are compared level by level on a real image at an even and an odd size; the
random elastic transform is checked through its parts: ``warp`` against scipy's ``map_coordinates`` and
the displacement field's statistics against the field the reference's own code produces.
"""


import imagecorruptions
import imagecorruptions.corruptions as reference
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.ndimage import map_coordinates

import trustseg.robustness.corruptions as corruptions
from trustseg.robustness.corruptions import corrupt, ops
from trustseg.robustness.corruptions.digital import PIXELATE_RATIO, elastic_field, pixelate_uint8, warp

pytestmark = pytest.mark.usefixtures("one_thread")  # small images: a second thread only adds OpenMP waits

SIZES = ((120, 160), (97, 131))


@pytest.fixture(scope="module")
def photos(photo) -> dict[tuple[int, int], np.ndarray]:
    """HxWx3 uint8: the photo resized to 120x160, and an odd 97x131 crop of it at full resolution."""
    resized = np.asarray(Image.fromarray(photo).resize((160, 120), Image.BILINEAR))
    return {(120, 160): resized, (97, 131): np.ascontiguousarray(photo[40:137, 60:191])}


def ours(photo: np.ndarray, name: str, severity: int) -> np.ndarray:
    image = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None]
    out, _ = corrupt(image, name, severity, torch.Generator().manual_seed(0))
    return out[0].permute(1, 2, 0).numpy()


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturate"])
def test_photometric_corruptions_match_the_reference_except_at_exact_level_ties(photos, name, size):
    """Tolerance: equal, except where the exact result is a whole level (e.g. saturate x2 gives 2x - v):
    there the reference's float64 rounding noise picks the truncated level, and ours may differ by 1."""
    photo = photos[size]
    for severity in range(1, 6):
        exact = getattr(reference, name)(Image.fromarray(photo), severity)  # float, before truncation
        diff = ours(photo, name, severity).astype(int) - np.uint8(exact)
        assert np.abs(diff).max() <= 1, (name, severity)
        off = exact[diff != 0]
        assert np.all(np.abs(off - np.round(off)) < 1e-3), f"{name} {severity}: mismatch away from a level tie"


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["pixelate", "jpeg_compression"])
def test_pixelate_and_jpeg_equal_the_reference_exactly(photos, name, size, backend):
    photo = photos[size]
    with ops.use_backend(backend):
        for severity in range(1, 6):
            want = imagecorruptions.corrupt(photo, severity, name)
            assert np.array_equal(ours(photo, name, severity), want), severity


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (41, 203), (256, 255)])
def test_pixelate_torch_backend_equals_pillow_on_noise(size):
    """Pillow's own BOX-then-NEAREST resizes on random levels at sizes whose box edges fall between pixels."""
    images = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with ops.use_backend("torch"):
        for severity, ratio in enumerate(PIXELATE_RATIO, 1):
            got = pixelate_uint8(images, severity, torch.Generator())
            for image, mine in zip(images, got):
                small = (int(size[1] * ratio), int(size[0] * ratio))
                want = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(small, Image.BOX)
                want = np.asarray(want.resize(size[::-1], Image.NEAREST))
                assert np.array_equal(mine.permute(1, 2, 0).numpy(), want), (size, severity)


def test_warp_equals_scipy_map_coordinates_with_reflect_borders():
    gen = torch.Generator().manual_seed(0)
    h, w = 23, 37
    x = torch.rand(2, 3, h, w, generator=gen)
    # Displacements of several image sizes exercise repeated reflection; whole and half-pixel values the ties.
    field = torch.randn(2, 2, h, w, generator=gen) * torch.tensor([8.0, 50.0]).view(1, 2, 1, 1)
    field[0, :, :4, :4] = torch.tensor([-0.5, 1.0]).view(2, 1, 1)
    field[1, :, :4, :4] = torch.tensor([-1.0, 36.5]).view(2, 1, 1)
    grid = np.mgrid[:h, :w]
    for mode, order, atol in (("bilinear", 1, 1e-6), ("nearest", 0, 0.0)):
        out = warp(x, field, mode)
        for b in range(2):
            coords = grid + field[b].numpy()
            for c in range(3):
                expected = map_coordinates(x[b, c].numpy(), coords, order=order, mode="reflect")
                np.testing.assert_allclose(out[b, c].numpy(), expected, rtol=0, atol=atol)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(3, 12), w=st.integers(3, 12), dy=st.integers(-30, 30), dx=st.integers(-30, 30),
       mode=st.sampled_from(["bilinear", "nearest"]))
def test_warp_by_whole_pixels_is_a_shift_of_the_symmetrically_padded_image(h, w, dy, dx, mode):
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    field = torch.tensor([float(dy), float(dx)]).view(1, 2, 1, 1).expand(1, 2, h, w)
    padded = np.pad(x[0, 0].numpy(), 31, mode="symmetric")
    expected = padded[31 + dy:31 + dy + h, 31 + dx:31 + dx + w]
    assert np.array_equal(warp(x, field, mode)[0, 0].numpy(), expected)


def _reference_field(h: int, w: int, severity: int, seed: int) -> np.ndarray:
    """The reference's own (dy, dx), read back from its elastic_transform of coordinate ramps (float in,
    float out, so nothing is quantised): bilinear resampling of a linear ramp returns the sampled position."""
    ys, xs = np.mgrid[:h, :w].astype(np.float64)
    ramps = np.stack([ys / (h - 1), xs / (w - 1), np.zeros_like(ys)], axis=-1) * 255
    np.random.seed(seed)
    warped = reference.elastic_transform(ramps, severity) / 255
    return np.stack([warped[..., 0] * (h - 1) - ys, warped[..., 1] * (w - 1) - xs])


@pytest.mark.parametrize("size", SIZES)
def test_elastic_field_statistics_match_the_reference(size):
    """Magnitude (std) and smoothness (std of the pixel-to-pixel change) within 6% over 8 fields each,
    measured inside a 12-pixel margin where no reflection reaches."""
    h, w = size
    inner = (slice(12, -12), slice(12, -12))
    for severity in (1, 5):
        ref = np.stack([_reference_field(h, w, severity, seed) for seed in range(8)])[..., inner[0], inner[1]]
        got = elastic_field(8, h, w, severity, seeded(*range(8))).numpy()[..., inner[0], inner[1]]
        for axis in (0, 1):
            for stat in (lambda f: f.std(), lambda f: np.diff(f, axis=-1 - axis).std()):
                assert stat(got[:, axis]) == pytest.approx(stat(ref[:, axis]), rel=0.06), (severity, axis)


def test_elastic_is_seeded_and_batch_independent(photos):
    images = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1)[:, :97, :131] for p in photos.values()])
    masks = torch.randint(0, 5, (2, 97, 131), generator=torch.Generator().manual_seed(3))
    a, moved_a = corrupt(images, "elastic_transform", 4, seeded(1, 2), masks)
    b, moved_b = corrupt(images, "elastic_transform", 4, seeded(1, 2), masks)
    alone, moved_alone = corrupt(images[1:], "elastic_transform", 4, seeded(2), masks[1:])
    assert torch.equal(a, b) and torch.equal(moved_a, moved_b)
    assert torch.equal(a[1:], alone) and torch.equal(moved_a[1:], moved_alone)
    assert not torch.equal(a, corrupt(images, "elastic_transform", 4, seeded(3, 4))[0])


def test_elastic_moves_labels_with_the_image():
    """An image that paints each label in its own colour: after the warp, decoding the colours must give
    the warped labels on >= 99% of the pixels whose 3x3 neighbourhood holds a single label."""
    palette = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=torch.uint8)
    blocks = torch.randint(0, len(palette), (2, 8, 10), generator=torch.Generator().manual_seed(0))
    labels = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :120, :157]
    images = palette[labels].permute(0, 3, 1, 2).contiguous()
    for severity in (1, 5):
        warped, moved = corrupt(images, "elastic_transform", severity, seeded(5, 6), masks=labels)
        decoded = torch.cdist(warped.permute(0, 2, 3, 1).float().reshape(-1, 3), palette.float()).argmin(1)
        window = torch.nn.functional.max_pool2d(moved[:, None].float(), 3, 1, 1)
        uniform = window == -torch.nn.functional.max_pool2d(-moved[:, None].float(), 3, 1, 1)
        agree = decoded.view_as(moved)[uniform[:, 0]] == moved[uniform[:, 0]]
        assert agree.float().mean() >= 0.99 and uniform.float().mean() > 0.25


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["elastic_transform", "brightness", "jpeg_compression"])
def test_corrupt_splits_large_batches_without_changing_the_result(photos, name, threads, monkeypatch):
    images = torch.stack([torch.from_numpy(p.copy()).permute(2, 0, 1)[:, :97, :131] for p in photos.values()] * 2)
    masks = torch.randint(0, 5, (4, 97, 131), generator=torch.Generator().manual_seed(3))
    whole, moved_whole = corrupt(images, name, 4, seeded(1, 2, 3, 4), masks)
    monkeypatch.setattr(corruptions, "CHUNK_PIXELS", 97 * 131)  # one image per call
    torch.set_num_threads(threads)  # 2: chunks run in parallel threads (the fixture restores 1)
    split, moved_split = corrupt(images, name, 4, seeded(1, 2, 3, 4), masks)
    assert torch.get_num_threads() == threads
    assert torch.equal(whole, split) and torch.equal(moved_whole, moved_split)
    assert (moved_split is masks) == (name != "elastic_transform")
