"""PAMR propagation that re-decides only uncertain pixels: naive per-pixel oracles, invariants, a
constructed scene with known labels."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from trustseg.errors import UserError
from trustseg.refine.propagation import (
    PAMR_DILATIONS, local_affinity, neighbour_offsets, refine_probabilities, uncertain_pixels,
)
from trustseg.refine.refiner import RefineConfig, Refiner, refine_logits


def padded(guide, dilations):
    pad = max(dilations)
    return F.pad(guide, (pad, pad, pad, pad), mode="replicate"), pad


def naive_kappa(image, dilations, b, y, x):
    """One pixel's kappa over its neighbours, written from the paper's formula with clamped coordinates."""
    _, C, H, W = image.shape
    at = lambda c, y, x: image[b, c, min(max(y, 0), H - 1), min(max(x, 0), W - 1)]  # noqa: E731
    stds = [torch.stack([at(c, y + d * dy, x + d * dx) for d in dilations for dy in (-1, 0, 1)
                         for dx in (-1, 0, 1)]).std() for c in range(C)]
    return torch.stack([sum(-abs(at(c, y + oy, x + ox) - at(c, y, x)) / (1e-8 + 0.1 * stds[c]) for c in range(C)) / C
                        for oy, ox in neighbour_offsets(dilations)])


def naive_affinity(guides, dilations):
    """Per pixel and neighbour, the softmax of the guides' mean kappa: (B, P, H, W)."""
    guides = [guides] if torch.is_tensor(guides) else guides
    B, _, H, W = guides[0].shape
    out = torch.zeros(B, len(neighbour_offsets(dilations)), H, W, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                out[b, :, y, x] = (sum(naive_kappa(g, dilations, b, y, x) for g in guides) / len(guides)).softmax(0)
    return out


def test_offsets_are_the_8_neighbours_of_each_dilation():
    offsets = neighbour_offsets(PAMR_DILATIONS)
    assert len(offsets) == 48 == len(set(offsets)) and (0, 0) not in offsets
    assert {max(abs(dy), abs(dx)) for dy, dx in offsets} == set(PAMR_DILATIONS)


def test_affinity_matches_a_per_pixel_reference_and_rows_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    image = 255 * torch.rand(2, 3, 7, 9, generator=generator, dtype=torch.float64)
    dilations = (1, 3)
    guide, pad = padded(image, dilations)
    affinity = local_affinity([guide], pad, (0, 7), 9, dilations)
    assert affinity.shape == (2, 16, 7, 9)
    torch.testing.assert_close(affinity, naive_affinity(image, dilations), rtol=1e-9, atol=1e-12)
    assert bool((affinity >= 0).all())
    torch.testing.assert_close(affinity.sum(1), torch.ones(2, 7, 9, dtype=torch.float64))


def test_two_guides_average_their_kappas_whatever_their_channel_counts():
    generator = torch.Generator().manual_seed(5)
    image = 255 * torch.rand(1, 3, 6, 7, generator=generator, dtype=torch.float64)
    features = torch.randn(1, 5, 6, 7, generator=generator, dtype=torch.float64)
    dilations = (1, 2)
    pad = max(dilations)
    affinity = local_affinity([padded(image, dilations)[0], padded(features, dilations)[0]], pad, (0, 6), 7, dilations)
    torch.testing.assert_close(affinity, naive_affinity([image, features], dilations), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(affinity.sum(1), torch.ones(1, 6, 7, dtype=torch.float64))

def test_one_step_with_every_pixel_uncertain_is_the_weighted_mean_of_the_neighbours():
    generator = torch.Generator().manual_seed(1)
    image = 255 * torch.rand(1, 3, 6, 8, generator=generator, dtype=torch.float64)
    probs = torch.rand(1, 4, 6, 8, generator=generator, dtype=torch.float64).softmax(1)
    dilations = (1, 2)
    alpha = naive_affinity(image, dilations)
    expected = torch.zeros_like(probs)
    for j, (oy, ox) in enumerate(neighbour_offsets(dilations)):
        for y in range(6):
            for x in range(8):
                expected[0, :, y, x] += alpha[0, j, y, x] * probs[0, :, min(max(y + oy, 0), 5), min(max(x + ox, 0), 7)]
    everything = torch.ones(1, 6, 8, dtype=torch.bool)
    out = refine_probabilities(probs, image, everything, iterations=1, dilations=dilations)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 6, 8, dtype=torch.float64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), percent=st.floats(0.5, 100), iterations=st.integers(1, 4),
       height=st.integers(1, 12), width=st.integers(1, 12), classes=st.integers(2, 5),
       scale=st.floats(0.1, 20))
def test_confident_pixels_never_change(seed, percent, iterations, height, width, classes, scale):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(2, classes, height, width, generator=generator)
    images = 255 * torch.rand(2, 3, height, width, generator=generator)
    config = RefineConfig(percent=percent, iterations=iterations, dilations=(1, 2, 4))
    out = refine_logits(logits, images, config)
    uncertain = uncertain_pixels(logits.softmax(1), percent)
    confident = ~uncertain[:, None].expand_as(logits)
    assert torch.equal(out[confident], logits.log_softmax(1)[confident])
    assert torch.equal(out.argmax(1)[~uncertain], logits.argmax(1)[~uncertain])
    torch.testing.assert_close(out.exp().sum(1), torch.ones(2, height, width))  # still log-probabilities


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), percent=st.floats(0.01, 100), height=st.integers(1, 10),
       width=st.integers(1, 10))
def test_uncertain_share_is_the_least_confident_pixels(seed, percent, height, width):
    generator = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(2, 4, height, width, generator=generator)).softmax(1)
    uncertain = uncertain_pixels(probs, percent)
    confidence = probs.amax(1)
    for b in range(2):
        chosen, rest = confidence[b][uncertain[b]], confidence[b][~uncertain[b]]
        assert chosen.numel() >= math.ceil(percent / 100 * height * width)
        if rest.numel():
            assert chosen.max() < rest.min()


def test_uncertain_share_of_100_percent_is_every_pixel():
    assert bool(uncertain_pixels(torch.rand(1, 3, 4, 5).softmax(1), 100).all())


def test_refinement_fixes_uncertain_mislabels_at_a_colour_edge():
    """Two flat colour regions (left: class 0, right: class 1); the model is confident and right away from
    the edge and unsure, often wrong, in a 6-px band around it. The oracle is the region label."""
    generator = torch.Generator().manual_seed(3)
    H, W, edge = 24, 32, 16
    labels = torch.zeros(H, W, dtype=torch.long)
    labels[:, edge:] = 1
    image = torch.empty(1, 3, H, W)
    image[0, :, :, :edge] = torch.tensor([200.0, 40.0, 30.0])[:, None, None]
    image[0, :, :, edge:] = torch.tensor([20.0, 60.0, 210.0])[:, None, None]
    logits = 4 * F.one_hot(labels, 2).permute(2, 0, 1)[None].float()
    band = slice(edge - 3, edge + 3)
    logits[0, :, :, band] = 0.3 * torch.randn(2, H, 6, generator=generator)  # unsure, about half wrong
    before = logits.argmax(1)[0]
    assert (before != labels).sum() > 20
    uncertain_share = 100 * 6 * H / (H * W)
    refined = refine_logits(logits, image, RefineConfig(percent=uncertain_share, iterations=10))
    assert torch.equal(refined.argmax(1)[0], labels)


def test_feature_guide_separates_regions_the_colours_do_not():
    """One flat colour, two regions told apart only by the features (left of column 8: class 0, right:
    class 1), an unsure band over columns 6-13, off-centre on the edge. Guided by the flat image the band
    splits at its middle (columns 8 and 9 wrong); guided by the features, or both, at the edge."""
    H, W, edge = 10, 20, 8
    labels = torch.zeros(H, W, dtype=torch.long)
    labels[:, edge:] = 1
    image = torch.full((1, 3, H, W), 128.0)
    features = torch.zeros(1, 2, H, W)
    features[0, 0, :, edge:] = 1.0
    features[0, 1, :, edge:] = -3.0
    logits = 4 * F.one_hot(labels, 2).permute(2, 0, 1)[None].float()
    logits[0, :, :, 6:14] = 0.0  # no preference: the band is what refinement decides
    decided = {guide: refine_logits(logits, image, RefineConfig(percent=40, iterations=10, guide=guide),
                                    features).argmax(1)[0] for guide in ("image", "features", "both")}
    assert (decided["image"] != labels).sum() == 2 * H
    assert torch.equal(decided["features"], labels) and torch.equal(decided["both"], labels)
    with pytest.raises(ValueError, match="needs the model's features"):
        refine_logits(logits, image, RefineConfig(guide="features"))


def test_an_unknown_guide_is_a_user_error():
    with pytest.raises(UserError, match="--refine-guide 'dino'"):
        RefineConfig(guide="dino")


def test_row_tiles_give_the_whole_image_result():
    generator = torch.Generator().manual_seed(4)
    image = 255 * torch.rand(2, 3, 23, 17, generator=generator)
    probs = (2 * torch.randn(2, 5, 23, 17, generator=generator)).softmax(1)
    uncertain = uncertain_pixels(probs, 40)
    whole = refine_probabilities(probs, image, uncertain, iterations=3, dilations=(1, 2, 4))
    for tile_rows in (1, 4, 7, 22):
        tiled = refine_probabilities(probs, image, uncertain, iterations=3, dilations=(1, 2, 4), tile_rows=tile_rows)
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("percent", [0, -5, 100.5, float("nan")])
def test_share_outside_0_100_is_a_user_error(percent):
    with pytest.raises(UserError, match="--refine-q"):
        RefineConfig(percent=percent)


def test_refiner_times_itself():
    refiner = Refiner(RefineConfig(iterations=2, dilations=(1,)))
    assert refiner.ms_per_image is None
    refiner(torch.randn(3, 2, 5, 6), torch.rand(3, 3, 5, 6))
    assert refiner.images == 3 and refiner.ms_per_image > 0
    refiner.reset()
    assert refiner.ms_per_image is None
