"""Which pixels teach: the losses against numpy on constructed logits, and their gradients' support."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from trustseg.adapt.losses import (anchored_uncertain_loss, entropy_threshold, pixel_entropy, reliable_entropy_loss,
                                   tent_loss)

K = 4
E0 = entropy_threshold(K)  # 0.4 ln 4 = 0.555 nats


def np_entropy(logits):
    """(K, N) -> (N,) in float64."""
    z = logits - logits.max(0)
    p = np.exp(z) / np.exp(z).sum(0)
    return -(p * np.log(p)).sum(0)


def mixed_logits():
    """(1, K, 2, 3): confident pixels (one logit 8 above the rest) on the top row, near-uniform ones below."""
    logits = torch.zeros(1, K, 2, 3)
    for column in range(3):
        logits[0, column % K, 0, column] = 8.0
    logits[0, :, 1] = torch.tensor([[0.1, -0.2, 0.0], [0.0, 0.1, 0.3], [-0.1, 0.0, 0.2], [0.05, 0.0, -0.1]])
    return logits


def test_threshold_is_eata_fraction_of_max_entropy():
    assert entropy_threshold(11) == pytest.approx(0.959, abs=1e-3)  # SHIFT.md table, CamVid
    assert entropy_threshold(1000) == pytest.approx(2.763, abs=1e-3)  # EATA main.py


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=K, max_size=K))
def test_pixel_entropy_matches_numpy_and_is_bounded(values):
    logits = torch.tensor(values, dtype=torch.float64).view(1, K, 1, 1)
    entropy = pixel_entropy(logits).item()
    assert entropy == pytest.approx(np_entropy(np.array(values)[:, None])[0], abs=1e-5)
    assert -1e-6 <= entropy <= math.log(K) + 1e-6


def test_reliable_loss_keeps_only_low_entropy_pixels():
    logits = mixed_logits().requires_grad_(True)
    entropy = np_entropy(logits.detach().numpy()[0].reshape(K, -1)).reshape(2, 3)
    assert (entropy[0] < E0).all() and (entropy[1] >= E0).all()  # the construction is what it claims
    loss = reliable_entropy_loss(logits, E0, "hard")
    assert loss.item() == pytest.approx(entropy[0].mean(), rel=1e-5)
    loss.backward()
    assert torch.count_nonzero(logits.grad[0, :, 1]) == 0  # uncertain pixels are left out
    assert torch.count_nonzero(logits.grad[0, :, 0]) > 0


def test_reliable_loss_eata_weighting_and_empty_selection():
    logits = mixed_logits()
    kept = np_entropy(logits.numpy()[0].reshape(K, -1)).reshape(2, 3)[0]
    loss = reliable_entropy_loss(logits, E0, "eata")
    assert loss.item() == pytest.approx((kept * np.exp(E0 - kept)).mean(), rel=1e-5)
    assert reliable_entropy_loss(torch.zeros(1, K, 3, 3), E0) is None  # all uniform: nothing teaches
    assert tent_loss(logits).item() == pytest.approx(np_entropy(logits.numpy()[0].reshape(K, -1)).mean(), rel=1e-5)


def test_uncertain_loss_is_entropy_of_uncertain_pixels_plus_anchor_kl_on_confident():
    logits = mixed_logits().requires_grad_(True)
    anchor = mixed_logits()
    anchor[0, :, 0] = anchor[0, :, 0].roll(1, dims=0)  # the source disagrees on the confident pixels
    flat, flat_anchor = logits.detach().numpy()[0].reshape(K, -1), anchor.numpy()[0].reshape(K, -1)
    entropy = np_entropy(flat)
    log_p = flat - np.log(np.exp(flat).sum(0))
    log_q = flat_anchor - np.log(np.exp(flat_anchor).sum(0))
    kl = (np.exp(log_q) * (log_q - log_p)).sum(0)
    confident = entropy < E0
    expected = entropy[~confident].mean() + 0.5 * kl[confident].mean()
    loss = anchored_uncertain_loss(logits, anchor, E0, anchor_weight=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_uncertain_loss_anchor_term_vanishes_at_the_anchor():
    logits = mixed_logits().requires_grad_(True)
    anchored_uncertain_loss(logits, mixed_logits(), E0).backward()
    torch.testing.assert_close(logits.grad[0, :, 0], torch.zeros(K, 3), atol=1e-7, rtol=0)  # KL minimal at p = anchor
    assert torch.count_nonzero(logits.grad[0, :, 1]) > 0  # the uncertain pixels are pushed to be sure
    # with no anchor weight the confident pixels do not teach at all, and the rest is their entropy's mean
    logits.grad = None
    loss = anchored_uncertain_loss(logits, torch.zeros_like(logits), E0, anchor_weight=0.0)
    assert loss.item() == pytest.approx(np_entropy(logits.detach().numpy()[0, :, 1]).mean(), rel=1e-5)
