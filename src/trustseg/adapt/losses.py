"""The adaptation objectives as pure functions of logits (B, K, H, W): which pixels teach, and how.

- TENT (Wang et al., ICLR 2021): the mean Shannon entropy of every pixel's softmax.
- Reliable pixels (EATA, Niu et al., ICML 2022; SAR, Niu et al., ICLR 2023): only pixels whose entropy is
  below E0 = 0.4 ln K teach, either all alike ("hard") or weighted by EATA's exp(E0 - H), so the more
  certain a pixel, the more it counts; the uncertain rest is left out.
- Uncertain pixels with confident anchors: the entropy of the pixels at or above E0 is minimised while
  the confident pixels are held to the prediction of the source model (KL(p_source || p)), so that
  sharpening the hard regions does not drag the easy ones away.

A loss returns None when no pixel teaches (nothing to step on), as EATA skips a batch without samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# EATA's and SAR's reliability threshold as a fraction of the maximal entropy ln K (EATA main.py: 0.4 ln 1000).
RELIABLE_FRACTION = 0.4
WEIGHTINGS = ("hard", "eata")


def pixel_entropy(logits: Tensor) -> Tensor:
    """Shannon entropy in nats of each pixel's softmax: (B, K, H, W) -> (B, H, W)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return -(log_probs.exp() * log_probs).sum(1)


def entropy_threshold(num_classes: int, fraction: float = RELIABLE_FRACTION) -> float:
    """E0 = fraction * ln K: the entropy below which a pixel counts as reliable."""
    return fraction * math.log(num_classes)


def tent_loss(logits: Tensor) -> Tensor:
    """Mean pixel entropy over the batch, the TENT objective."""
    return pixel_entropy(logits).mean()


def reliable_entropy_loss(logits: Tensor, threshold: float, weighting: str = "hard") -> Tensor | None:
    """Mean (weighted) entropy of the pixels with entropy < `threshold`; None when there are none.

    `weighting` "hard": every kept pixel counts alike (SAR); "eata": pixel weight exp(threshold - H),
    detached as in EATA's re-weighting, so the weight scales a pixel's gradient without being optimised.
    The weighted sum is divided by the number of kept pixels, as EATA takes the mean over kept samples.
    """
    entropy = pixel_entropy(logits)
    reliable = entropy < threshold
    if not bool(reliable.any()):
        return None
    kept = entropy[reliable]
    if weighting == "eata":
        kept = kept * torch.exp(threshold - kept.detach())
    elif weighting != "hard":
        raise ValueError(f"weighting {weighting!r}: expected one of {WEIGHTINGS}")
    return kept.mean()


def anchored_uncertain_loss(logits: Tensor, anchor_logits: Tensor, threshold: float,
                            anchor_weight: float = 1.0) -> Tensor | None:
    """Entropy of the uncertain pixels (H >= threshold) plus `anchor_weight` x KL(p_anchor || p) on the
    confident ones (H < threshold); None when both sets are empty (never, for a non-empty batch).

    Each term is a mean over its own pixels, so a few uncertain pixels are not drowned by many confident
    ones. `anchor_logits` (B, K, H, W) are the source model's, taken as constants.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    entropy = -(log_probs.exp() * log_probs).sum(1)
    confident = entropy < threshold
    terms = []
    if bool((~confident).any()):
        terms.append(entropy[~confident].mean())
    if bool(confident.any()):
        anchor = F.log_softmax(anchor_logits.detach().float(), dim=1)
        divergence = (anchor.exp() * (anchor - log_probs)).sum(1)
        terms.append(anchor_weight * divergence[confident].mean())
    return sum(terms) if terms else None
