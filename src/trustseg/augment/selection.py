"""Which pixels of a training image to preserve: pure functions on one image's label map and entropy map.

Röhrich et al. 2026, "Preserve the Hard, Regenerate the Rest" (step 2): the per-pixel Shannon entropy
H = -sum_k p_k ln(p_k + 1e-6) of a trained model's softmax; for every ground-truth class present (ignore
pixels excluded) the mean entropy over its pixels; whole classes are added in order of decreasing mean
entropy until the preserved union strictly exceeds tau * H * W (the class that crosses the threshold is
kept whole, so the area may overshoot). When every class together does not exceed it, all are kept.

Selectors (`SELECTORS`): ``entropy-high`` (the paper's), and the paper's ablations ``entropy-low``
(lowest mean entropy first), ``random-class`` (classes in a seeded random order), ``random-region`` (a
seeded random square of area >= tau * H * W, whatever its labels) and ``no-model`` (random classes,
no checkpoint at all).

Ties: classes with equal mean entropy are taken in increasing class id, for both entropy orders, so
the selection is a deterministic function of the inputs.

Images are ranked by the area-weighted mean entropy of their selected classes, i.e. the mean entropy
over the preserved, labelled pixels (`Selection.score`), highest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trustseg.errors import UserError

# Röhrich et al. add 1e-6 inside the logarithm (their calculate_shannon_entropy), natural log.
ENTROPY_EPS = 1e-6
ENTROPY_SELECTORS = ("entropy-high", "entropy-low")
SELECTORS = (*ENTROPY_SELECTORS, "random-class", "random-region", "no-model")


def pixel_entropy(probs: Tensor) -> Tensor:
    """-sum_k p_k ln(p_k + 1e-6) in nats: probabilities (B, K, H, W) -> (B, H, W)."""
    return -(probs * torch.log(probs + ENTROPY_EPS)).sum(1)


def check_tau(tau: float) -> float:
    """`tau`, the preserved fraction of the image, if it lies in (0, 1)."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau < 1:
        raise UserError(f"--tau {tau!r}: expected the preserved fraction of each image, a number in (0, 1)")
    return float(tau)


def check_selector(selector: str) -> str:
    if selector not in SELECTORS:
        raise UserError(f"--selector {selector!r}: expected one of {', '.join(SELECTORS)}")
    return selector


@dataclass(frozen=True)
class ClassEntropy:
    """One ground-truth class of an image: its id, pixel count and mean entropy (NaN without a map)."""

    class_id: int
    pixels: int
    mean_entropy: float


def class_entropies(labels: Tensor, entropy: Tensor | None, num_classes: int) -> list[ClassEntropy]:
    """The classes present in `labels` (H, W) (ids 0..K-1; every other value, the ignore label included,
    counts nowhere), in increasing id, with their mean of `entropy` (H, W) (NaN when it is None)."""
    labels = labels.reshape(-1).long()
    valid = (labels >= 0) & (labels < num_classes)
    counts = torch.bincount(labels[valid], minlength=num_classes)
    sums = (torch.bincount(labels[valid], weights=entropy.reshape(-1)[valid].double(), minlength=num_classes)
            if entropy is not None else None)
    present = torch.nonzero(counts).flatten().tolist()
    return [ClassEntropy(c, int(counts[c]), float(sums[c] / counts[c]) if sums is not None else math.nan)
            for c in present]


def class_order(classes: list[ClassEntropy], selector: str, generator: torch.Generator | None = None) -> list[int]:
    """The order in which `selector` adds `classes`: by mean entropy (ties: lower id first) or at random."""
    if selector == "entropy-high":
        return [c.class_id for c in sorted(classes, key=lambda c: (-c.mean_entropy, c.class_id))]
    if selector == "entropy-low":
        return [c.class_id for c in sorted(classes, key=lambda c: (c.mean_entropy, c.class_id))]
    if selector in ("random-class", "no-model"):
        permutation = torch.randperm(len(classes), generator=generator).tolist()
        return [classes[i].class_id for i in permutation]
    raise ValueError(f"{selector!r} does not order classes")


def classes_to_preserve(classes: list[ClassEntropy], order: list[int], tau: float, image_pixels: int) -> list[int]:
    """The first classes of `order` whose union strictly exceeds tau * image_pixels (the class that crosses
    the threshold included); all of them when their union never exceeds it."""
    counts = {c.class_id: c.pixels for c in classes}
    chosen, area = [], 0
    for class_id in order:
        chosen.append(class_id)
        area += counts[class_id]
        if area > tau * image_pixels:
            break
    return chosen


def square_side(tau: float, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the random region: the smallest square of area >= tau * H * W; a side longer than the
    image is cut to it and the other side grown so the area still reaches tau * H * W."""
    side = math.ceil(math.sqrt(tau * height * width))
    if side <= min(height, width):
        return side, side
    if height <= width:
        return height, min(width, math.ceil(tau * height * width / height))
    return min(height, math.ceil(tau * height * width / width)), width


def random_box(tau: float, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a square (`square_side`) placed uniformly at random inside the image."""
    box_h, box_w = square_side(tau, height, width)
    top = int(torch.randint(height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(width - box_w + 1, (1,), generator=generator))
    return top, left, box_h, box_w


@dataclass(frozen=True)
class Selection:
    """What one image keeps: `classes` (in the order added; for a region, the classes inside it) or a
    `box` (top, left, h, w), and the `score` that ranks the image (NaN without an entropy map)."""

    classes: tuple[int, ...]
    box: tuple[int, int, int, int] | None
    score: float

    def preserve_mask(self, labels: Tensor) -> Tensor:
        """bool (H, W): True where the original pixels are kept."""
        if self.box is not None:
            top, left, box_h, box_w = self.box
            mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
            mask[top: top + box_h, left: left + box_w] = True
            return mask
        return torch.isin(labels, torch.tensor(self.classes, dtype=labels.dtype, device=labels.device))


def preserved_score(preserve: Tensor, labels: Tensor, entropy: Tensor | None, num_classes: int) -> float:
    """Mean entropy over the preserved pixels with a class label: for whole classes, the area-weighted mean
    of their mean entropies. NaN without an entropy map or without such pixels."""
    counted = preserve & (labels >= 0) & (labels < num_classes)
    if entropy is None or not bool(counted.any()):
        return math.nan
    return float(entropy[counted].double().mean())


def select(labels: Tensor, entropy: Tensor | None, *, num_classes: int, tau: float, selector: str,
           generator: torch.Generator | None = None) -> Selection:
    """The pixels of one image to preserve: labels (H, W), entropy (H, W) or None (see module doc).

    The entropy selectors need `entropy`; the random ones draw from `generator`.
    """
    check_tau(tau)
    check_selector(selector)
    if selector in ENTROPY_SELECTORS and entropy is None:
        raise ValueError(f"selector {selector!r} needs an entropy map")
    height, width = labels.shape
    if selector == "random-region":
        box = random_box(tau, height, width, generator)
        selection = Selection((), box, math.nan)
        inside = labels[box[0]: box[0] + box[2], box[1]: box[1] + box[3]]
        classes = tuple(c.class_id for c in class_entropies(inside, None, num_classes))
    else:
        present = class_entropies(labels, entropy, num_classes)
        classes = tuple(classes_to_preserve(present, class_order(present, selector, generator), tau, height * width))
        selection = Selection(classes, None, math.nan)
    score = preserved_score(selection.preserve_mask(labels), labels, entropy, num_classes)
    return Selection(classes, selection.box, score)


def rank_images(scores: list[float]) -> list[int]:
    """Image indices by decreasing score; equal scores in increasing index, NaN scores last (in index order)."""
    def key(i: int) -> tuple[bool, float, int]:
        unscored = math.isnan(scores[i])
        return unscored, 0.0 if unscored else -scores[i], i

    return sorted(range(len(scores)), key=key)
