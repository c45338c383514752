"""The safety guard of online adaptation: watch the stream, say when to go back to the source model.

Entropy minimisation can run away: every pixel made confident in one class (SAR, Niu et al., ICLR 2023,
report TENT at 2 % accuracy on ImageNet-C under label shift; a TENT user saw Cityscapes -> Zurich drop
from 32 to 16 % mIoU). Three symptoms reset the adapted parameters and the optimizer:

- entropy collapse, SAR's recovery rule: an exponential moving average of the batch mean entropy
  (momentum 0.9, as SAR) falls below a floor. SAR's floor, 0.2 nats, was set for K = 1000 classes; we
  keep its share of the maximal entropy, 0.2 / ln 1000 = 2.9 % of ln K (our scaling: the paper has none
  for small K);
- entropy rise: the mean entropy of the latest `window` batches exceeds that of the first `window`
  batches since the (re)start by more than `max_entropy_rise` (relative): the model grows less sure of
  the same stream, the sign of drifting parameters;
- class collapse: one class takes more than `max_class_share` of the pixels predicted in the latest
  `window` batches. A stream that truly is one class needs a higher share.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor

from trustseg.errors import UserError

SAR_FLOOR_SHARE = 0.2 / math.log(1000)  # SAR main.py: reset when ema < 0.2 nats, at K = 1000


@dataclass(frozen=True)
class GuardConfig:
    window: int = 8  # batches per window
    ema_momentum: float = 0.9  # SAR
    entropy_floor_share: float = SAR_FLOOR_SHARE  # of ln K
    max_entropy_rise: float = 0.5  # relative rise of the window mean over the reference window
    max_class_share: float = 0.95

    def __post_init__(self) -> None:
        if self.window < 1:
            raise UserError(f"guard window {self.window}: expected >= 1 batch")
        if not (0 <= self.ema_momentum < 1 and self.entropy_floor_share >= 0 and self.max_entropy_rise > 0
                and 0 < self.max_class_share <= 1):
            raise UserError(f"guard settings {self}: expected momentum in [0, 1), floor >= 0, rise > 0, "
                            "class share in (0, 1]")


class CollapseGuard:
    """Observes each batch's mean entropy and predicted-class counts; `observe` returns why to reset, or None.

    After a reset call `restart`: the moving average, the reference window and the class counts start over.
    """

    def __init__(self, num_classes: int, config: GuardConfig = GuardConfig()) -> None:
        self.num_classes, self.config = num_classes, config
        self.entropy_floor = config.entropy_floor_share * math.log(num_classes)
        self.restart()

    def restart(self) -> None:
        self.ema: float | None = None
        self.reference: list[float] = []  # the first `window` batch entropies since the (re)start
        self.recent: deque[float] = deque(maxlen=self.config.window)
        self.class_counts: deque[Tensor] = deque(maxlen=self.config.window)
        self.seen = 0

    def observe(self, mean_entropy: float, predictions: Tensor) -> str | None:
        """Record one batch: its mean pixel entropy (nats) and its predicted classes (B, H, W) int."""
        config = self.config
        self.seen += 1
        self.ema = mean_entropy if self.ema is None else config.ema_momentum * self.ema + (1 - config.ema_momentum) * mean_entropy
        if len(self.reference) < config.window:
            self.reference.append(mean_entropy)
        self.recent.append(mean_entropy)
        self.class_counts.append(torch.bincount(predictions.flatten(), minlength=self.num_classes).cpu())
        if self.ema < self.entropy_floor:
            return f"entropy collapse: moving average {self.ema:.4f} < floor {self.entropy_floor:.4f} nats"
        if self.seen >= 2 * config.window:  # the latest window no longer overlaps the reference one
            reference, latest = sum(self.reference) / len(self.reference), sum(self.recent) / len(self.recent)
            if latest > (1 + config.max_entropy_rise) * reference:
                return (f"entropy rise: mean {latest:.4f} over the last {config.window} batches > "
                        f"{1 + config.max_entropy_rise:g} x {reference:.4f} of the first {config.window}")
        if len(self.class_counts) == config.window:
            counts = torch.stack(list(self.class_counts)).sum(0)
            share, dominant = (counts.max() / counts.sum()).item(), int(counts.argmax())
            if share > config.max_class_share:
                return (f"class collapse: class {dominant} takes {100 * share:.1f}% of the pixels of the last "
                        f"{config.window} batches (max {100 * config.max_class_share:g}%)")
        return None
