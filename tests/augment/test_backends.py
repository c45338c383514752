"""The opencv and texture regeneration backends."""

import numpy as np
import pytest
import torch

from trustseg.augment.backends import (
    BackendConfig, build_backend, donor_of, opencv_backend, resize_image, texture_backend,
)
from trustseg.errors import UserError


class Images:
    """A dataset of `count` images of different sizes whose pixels encode their index."""

    def __init__(self, count):
        self.images = [torch.full((3, 10 + i, 14 + 2 * i), 20 * i, dtype=torch.uint8) for i in range(count)]
        for i, image in enumerate(self.images):
            image[:, :, image.shape[-1] // 2:] += 7  # left and right halves differ: mirroring is visible

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].clone()
        return {"image": image, "mask": torch.zeros(image.shape[1:], dtype=torch.long), "path": f"img{index}"}


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpainting_a_constant_image_keeps_its_colour_and_its_preserved_pixels(method):
    image = torch.tensor([30, 140, 220], dtype=torch.uint8).view(3, 1, 1).expand(3, 24, 32).contiguous()
    image[:, :6] = 90  # a band the hole does not reach
    mask = torch.zeros(24, 32, dtype=torch.bool)
    mask[10:20, 5:28] = True
    out = opencv_backend(method)(image, mask, seed=0, index=0)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    # the hole is surrounded by one colour, so it is filled with that colour, up to the few levels of
    # rounding cv2's 8-bit arithmetic adds (the grey band, 50+ levels away, does not bleed in)
    assert (out[:, mask].int() - image[:, 12:13, 0].int()).abs().max() <= 4


def test_donors_are_other_images_deterministic_and_cover_the_dataset():
    count = 5
    draws = [[donor_of(i, count, seed) for seed in range(40)] for i in range(count)]
    for i, row in enumerate(draws):
        assert all(donor != i for donor, _ in row)
        assert {donor for donor, _ in row} == set(range(count)) - {i}
        assert {mirrored for _, mirrored in row} == {True, False}
    assert donor_of(3, count, 11) == donor_of(3, count, 11)
    assert donor_of(0, 1, 7) == (0, True)


def test_texture_fills_the_regenerated_pixels_from_the_resized_donor():
    data = Images(4)
    backend = texture_backend(data)
    image = data[2]["image"]
    mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    mask[:, ::3] = True
    out = backend(image, mask, seed=5, index=2)
    donor, mirrored = donor_of(2, 4, 5)
    expected = resize_image(data[donor]["image"], *image.shape[1:])
    expected = expected.flip(-1) if mirrored else expected
    assert torch.equal(out[:, mask], expected[:, mask])
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    assert torch.equal(out, backend(image, mask, seed=5, index=2))


def test_resize_matches_cv2_and_keeps_equal_sizes():
    image = torch.randint(0, 256, (3, 9, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert resize_image(image, 9, 13) is image
    import cv2

    expected = cv2.resize(image.permute(1, 2, 0).numpy(), (6, 4), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(resize_image(image, 4, 6).permute(1, 2, 0).numpy(), expected)


def test_backend_names_and_settings_are_checked():
    with pytest.raises(UserError, match="--backend 'gan'"):
        BackendConfig(name="gan")
    with pytest.raises(UserError, match="--opencv-method 'fast'"):
        BackendConfig(opencv_method="fast")
    backend = build_backend(BackendConfig(name="opencv", opencv_method="ns"), Images(2), "folder", torch.device("cpu"))
    image = Images(2)[1]["image"]
    mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    mask[2:5, 3:6] = True
    assert torch.equal(backend(image, mask, seed=0, index=1), opencv_backend("ns")(image, mask, seed=0, index=1))
