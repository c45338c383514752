"""Per-pixel uncertainty maps: from one softmax (entropy, msp, margin) or from MC dropout.

Every map is (B, H, W) in [0, 1], 0 = certain, and ranks pixels in the same direction, so a map can
be thresholded, histogrammed (`metrics.UncertaintyHistogram`) or used to pick hard pixels without
knowing which method made it:

- **entropy**: Shannon entropy of the softmax divided by its maximum ln K, so the scale does not
  depend on the number of classes (nats = entropy x ln K). One class: 0.
- **msp**: 1 - max_k p_k, one minus the maximum softmax probability (Hendrycks & Gimpel 2017).
- **margin**: 1 - (p_(1) - p_(2)), one minus the gap between the two largest probabilities.
- **mc-dropout** (Gal & Ghahramani 2016): T forward passes with dropout and stochastic depth kept on;
  the map is the normalised entropy of the mean softmax (the "predictive entropy" of Kendall & Gal
  2017 / Mukhoti & Gal 2018). `mc_dropout` also returns the mutual information between prediction
  and dropout mask, entropy of the mean - mean entropy (same normalisation), the epistemic part
  (**mutual-information** in `trustseg eval`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from trustseg.errors import UserError


def entropy(probs: Tensor) -> Tensor:
    """Normalised entropy -sum_k p_k ln p_k / ln K in [0, 1]: probabilities (B, K, H, W) -> (B, H, W)."""
    num_classes = probs.shape[1]
    if num_classes == 1:
        return probs.new_zeros(probs.shape[:1] + probs.shape[2:])
    # xlogy gives 0 for p = 0 (float32 softmax underflows); rounding can overshoot 1 by an ulp
    nats = -torch.special.xlogy(probs, probs).sum(1)
    return (nats / math.log(num_classes)).clamp_(0, 1)


def msp(probs: Tensor) -> Tensor:
    """1 - max_k p_k: probabilities (B, K, H, W) -> (B, H, W), in [0, 1 - 1/K]."""
    return 1 - probs.amax(1)


def margin(probs: Tensor) -> Tensor:
    """1 - (largest - second largest probability): (B, K, H, W) -> (B, H, W); 0 for one class."""
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] == 2 else 0
    return 1 - (top[:, 0] - second)


# Uncertainty measures of one softmax; the names are the CLI's `--uncertainty` values.
UNCERTAINTY: dict[str, Callable[[Tensor], Tensor]] = {"entropy": entropy, "msp": msp, "margin": margin}
MC_DROPOUT = "mc-dropout"
METHODS = (*UNCERTAINTY, MC_DROPOUT)
# Measures from MC-dropout passes (`mc_dropout_maps`) that `trustseg eval` scores as error detectors.
MUTUAL_INFORMATION = "mutual-information"
MC_MEASURES = (MC_DROPOUT, MUTUAL_INFORMATION)
# Every measure an error-detection metric can score: from one softmax, or from MC-dropout maps.
SCORED_MEASURES = (*UNCERTAINTY, *MC_MEASURES)

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# Our models' stochastic depth and attention dropout are float rates on the module that applies
# them when `self.training` is set (models/vit.py and models/segformer.py Block.drop_path,
# EfficientSelfAttention.attn_dropout), not separate layers.
RATE_ATTRIBUTES = ("drop_path", "attn_dropout")


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that drop activations at random in training mode with a rate > 0."""
    found = []
    for module in model.modules():
        rates = [getattr(module, name, None) for name in RATE_ATTRIBUTES]
        if isinstance(module, DROPOUT_LAYERS):
            rates.append(module.p)
        if any(isinstance(rate, float) and rate > 0 for rate in rates):
            found.append(module)
    return found


def require_dropout(model: nn.Module, fix: str = "use a model trained with dropout") -> list[nn.Module]:
    """`dropout_modules(model)`, or `UserError` ending with `fix` when there are none."""
    modules = dropout_modules(model)
    if not modules:
        raise UserError(
            f"MC dropout needs dropout, but the model has no dropout or drop-path layer with a rate > 0; {fix}"
        )
    return modules


@contextmanager
def dropout_enabled(model: nn.Module) -> Iterator[None]:
    """Put only the dropout-type modules of `model` in training mode, and restore every flag after.

    The flag is set on each such module alone (not `train()`, which recurses), so BatchNorm keeps
    its running statistics and every other layer behaves as in evaluation.
    """
    modules = require_dropout(model)
    before = [module.training for module in modules]
    try:
        for module in modules:
            module.training = True
        yield
    finally:
        for module, flag in zip(modules, before):
            module.training = flag


@dataclass(frozen=True)
class MCDropoutResult:
    """Mean softmax (B, K, H, W) of the passes and two (B, H, W) maps in [0, 1] (see module doc)."""

    probs: Tensor
    entropy: Tensor
    mutual_information: Tensor


def mc_dropout(predictor: nn.Module, images: Tensor, *, samples: int = 8, seed: int = 0) -> MCDropoutResult:
    """`samples` stochastic passes of `predictor` (images -> logits) over `images` (B, 3, H, W).

    The dropout masks come from the global torch generator seeded with `seed` inside a fork, so the
    result is reproducible and the caller's random state is left untouched. Sums are kept, not the
    passes, so memory does not grow with `samples`. No gradients are recorded.
    """
    if not isinstance(samples, int) or samples < 1:
        raise UserError(f"MC dropout samples must be a positive integer, got {samples!r}")
    device = images.device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(seed)
        total_probs = total_entropy = 0
        with dropout_enabled(predictor), torch.no_grad():
            for _ in range(samples):
                probs = predictor(images).softmax(1)
                total_probs = total_probs + probs
                total_entropy = total_entropy + entropy(probs)
    mean = total_probs / samples
    predictive = entropy(mean)
    # entropy of the mean >= mean entropy (Jensen); the clamp only removes rounding below zero
    information = (predictive - total_entropy / samples).clamp_(min=0)
    return MCDropoutResult(probs=mean, entropy=predictive, mutual_information=information)


def mc_dropout_maps(result: MCDropoutResult) -> dict[str, Tensor]:
    """The `MC_MEASURES` maps of one `mc_dropout` result, by name."""
    return {MC_DROPOUT: result.entropy, MUTUAL_INFORMATION: result.mutual_information}
