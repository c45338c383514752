"""Feathered paste-back and ignore labelling, pixel by pixel, against scipy and a naive window check."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.ndimage import gaussian_filter

from trustseg.augment.compose import compose, feather_alpha, feather_radius

IGNORE = 255


def random_case(seed, height=13, width=17):
    generator = torch.Generator().manual_seed(seed)
    original = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    generated = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (height, width), generator=generator)
    labels[torch.rand(height, width, generator=generator) < 0.1] = IGNORE
    preserve = torch.zeros(height, width, dtype=torch.bool)
    top, left = int(torch.randint(0, 4, (1,), generator=generator)), int(torch.randint(0, 4, (1,), generator=generator))
    preserve[top: top + 9, left: left + 12] = True
    preserve[0, -1] = True  # an isolated pixel: blended, never labelled
    return original, generated, labels, preserve


def test_alpha_is_scipys_truncated_gaussian_of_the_mask():
    _, _, _, preserve = random_case(0)
    expected = gaussian_filter(preserve.numpy().astype(np.float64), 1.5, mode="nearest", truncate=3.0)
    assert feather_radius(1.5) == 5
    np.testing.assert_allclose(feather_alpha(preserve).numpy(), expected, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.7, 1.5, 2.0]))
def test_labels_keep_exactly_the_fully_preserved_pixels(seed, sigma):
    original, generated, labels, preserve = random_case(seed)
    image, new_labels, alpha = compose(original, generated, labels, preserve, ignore_index=IGNORE, sigma=sigma)
    radius = feather_radius(sigma)
    height, width = labels.shape
    mask = preserve.numpy()
    for i in range(height):
        for j in range(width):
            window = mask[max(0, i - radius): i + radius + 1, max(0, j - radius): j + radius + 1]
            if window.all():  # fully preserved, outside the feather: the original pixel and label
                assert alpha[i, j] == 1.0
                assert new_labels[i, j] == labels[i, j]
                assert torch.equal(image[:, i, j], original[:, i, j])
            else:  # generated or feathered: ignored
                assert alpha[i, j] < 1.0
                assert new_labels[i, j] == IGNORE
            if not window.any():
                assert alpha[i, j] == 0.0 and torch.equal(image[:, i, j], generated[:, i, j])
    blend = alpha.numpy() * original.double().numpy() + (1 - alpha.numpy()) * generated.double().numpy()
    assert np.abs(image.double().numpy() - blend).max() <= 0.5 + 1e-9


def test_the_feather_reaches_both_sides_of_the_boundary():
    preserve = torch.zeros(20, 20, dtype=torch.bool)
    preserve[:, :10] = True
    alpha = feather_alpha(preserve)
    row = alpha[10]
    assert (row[:5] == 1).all() and (row[15:] == 0).all()
    assert ((row[5:15] > 0) & (row[5:15] < 1)).all()
    assert torch.all(row[:-1] >= row[1:])  # monotone across the edge
    assert row[9] > 0.5 > row[10]


def test_a_preserved_image_border_is_not_feathered():
    preserve = torch.zeros(12, 12, dtype=torch.bool)
    preserve[:6, :] = True
    labels = torch.ones(12, 12, dtype=torch.long)
    _, new_labels, alpha = compose(torch.zeros(3, 12, 12, dtype=torch.uint8), torch.zeros(3, 12, 12, dtype=torch.uint8),
                                   labels, preserve, ignore_index=IGNORE)
    assert (alpha[0] == 1).all() and (new_labels[0] == 1).all()
    assert (new_labels[1:] == IGNORE).all()  # rows 1..5 lie within 5 px of the regenerated half


def test_mismatched_shapes_are_refused():
    original, generated, labels, preserve = random_case(1)
    with pytest.raises(ValueError, match="shapes differ"):
        compose(original, generated[:, :-1], labels, preserve, ignore_index=IGNORE)
