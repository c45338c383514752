"""An adapting predictor: images in, logits out, and on the way one or more optimizer steps on the
normalisation layers' affine parameters. Evaluating adaptation is the shared evaluation loop with this
predictor in place of the plain one.

Per batch (B, 3, H, W) -> logits (B, K, H, W):
1. episodic mode: the parameters and the optimizer go back to the source state (one episode per batch;
   batch size 1 makes it one per image). Online mode carries them from batch to batch.
2. forward with the current parameters; online mode shows this forward to the guard, and if the guard
   finds a collapse the parameters and optimizer are reset (reason logged) and the forward is redone.
3. `steps` times (never for the method norm): the method's loss on the latest forward, backward, optimizer
   step. A batch in which no pixel teaches takes no step; a loss that is not finite resets, and the batch
   is predicted by the source.
4. the prediction: "before" returns the forward of step 2, TENT's choice (`tent.py`: the output is
   computed before the update); "after" runs one more forward with the updated parameters. "auto" is
   "before" online and "after" episodic: an episode reset before each batch would otherwise never show
   its update (episodic "before" is plain test-batch normalisation).

The evaluation loop runs under `torch.inference_mode`; gradients are switched back on inside, and the
images, inference tensors there, are cloned into normal ones, which autograd requires.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trustseg.adapt.guard import CollapseGuard, GuardConfig
from trustseg.adapt.losses import (RELIABLE_FRACTION, WEIGHTINGS, anchored_uncertain_loss, entropy_threshold,
                                   pixel_entropy, reliable_entropy_loss, tent_loss)
from trustseg.adapt.params import configure_for_adaptation
from trustseg.errors import UserError

# norm: test-batch statistics in BatchNorm, no update (Schneider et al., NeurIPS 2020; TENT's "BN" baseline),
# which separates what the statistics do from what the entropy steps do
METHODS = ("norm", "tent", "reliable", "uncertain")
MODES = ("online", "episodic")
OPTIMIZERS = ("adam", "sgd")
PREDICT = ("auto", "before", "after")

log = logging.getLogger("trustseg.adapt")


@dataclass(frozen=True)
class AdaptConfig:
    """How to adapt. Defaults: Adam at lr 1e-4 with one step per batch, the setting segmentation TENT
    reproductions use at batch 1 (VPTTA); EATA/SAR use SGD, lr 2.5e-4, momentum 0.9 at batch 64."""

    method: str = "tent"
    mode: str = "online"
    optimizer: str = "adam"
    lr: float = 1e-4
    momentum: float = 0.9  # SGD only
    steps: int = 1
    predict: str = "auto"
    reliable_fraction: float = RELIABLE_FRACTION  # reliable/uncertain split at entropy E0 = fraction * ln K
    weighting: str = "hard"  # reliable: "hard" (all kept pixels alike) or "eata" (exp(E0 - H))
    anchor_weight: float = 1.0  # uncertain: weight of KL(p_source || p) on the confident pixels
    bn_prior: float = 0.0  # BatchNorm: the source statistics count as this many images against the batch's
    guard: GuardConfig | None = field(default_factory=GuardConfig)  # online only; None: never reset

    def __post_init__(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("mode", self.mode, MODES),
                                     ("optimizer", self.optimizer, OPTIMIZERS), ("predict", self.predict, PREDICT),
                                     ("weighting", self.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise UserError(f"adaptation {name} {value!r}: expected one of {', '.join(allowed)}")
        if not (self.lr > 0 and self.steps >= 1 and 0 <= self.momentum < 1 and 0 < self.reliable_fraction <= 1
                and self.anchor_weight >= 0 and 0 <= self.bn_prior < math.inf):
            raise UserError(f"adaptation settings lr {self.lr}, steps {self.steps}, momentum {self.momentum}, reliable "
                            f"fraction {self.reliable_fraction}, anchor weight {self.anchor_weight}, BatchNorm prior "
                            f"{self.bn_prior}: expected lr > 0, steps >= 1, momentum in [0, 1), fraction in (0, 1], "
                            "weight >= 0, prior finite and >= 0")

    @property
    def learns(self) -> bool:
        return self.method != "norm"

    @property
    def predicts_after_update(self) -> bool:
        return self.learns and (self.predict == "after" or (self.predict == "auto" and self.mode == "episodic"))


class AdaptingPredictor:
    """Wraps `source` (images (B, 3, H, W) -> logits (B, K, H, W), an `nn.Module`), which stays untouched:
    a copy of it is adapted. The source itself gives the anchors of the "uncertain" method."""

    def __init__(self, source: nn.Module, num_classes: int, config: AdaptConfig = AdaptConfig(),
                 what: str = "the model") -> None:
        self.source, self.config = source, config
        self.model = copy.deepcopy(source)
        self.parameters = configure_for_adaptation(self.model, what, config.bn_prior)
        self.initial = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.threshold = entropy_threshold(num_classes, config.reliable_fraction)
        self.guard = CollapseGuard(num_classes, config.guard) if config.guard and config.mode == "online" else None
        self.optimizer = self._new_optimizer()
        self.batches = self.updates = self.skipped = 0
        self.resets: list[dict[str, Any]] = []

    def _new_optimizer(self) -> torch.optim.Optimizer:
        parameters = list(self.parameters.values())
        if self.config.optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.config.lr, momentum=self.config.momentum)
        return torch.optim.Adam(parameters, lr=self.config.lr)

    def reset(self, reason: str | None = None) -> None:
        """Back to the source parameters with a fresh optimizer; a `reason` is a safety reset, logged."""
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.copy_(self.initial[name])
        self.optimizer = self._new_optimizer()
        if self.guard is not None:
            self.guard.restart()
        if reason is not None:
            self.resets.append({"batch": self.batches, "reason": reason})
            log.info("adaptation reset at batch %d: %s", self.batches, reason)

    def loss(self, logits: Tensor, anchor: Tensor | None) -> Tensor | None:
        method = self.config.method
        if method == "tent":
            return tent_loss(logits)
        if method == "reliable":
            return reliable_entropy_loss(logits, self.threshold, self.config.weighting)
        return anchored_uncertain_loss(logits, anchor, self.threshold, self.config.anchor_weight)

    def __call__(self, images: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            images = images.clone()  # an inference tensor cannot take part in autograd
            if self.config.mode == "episodic":
                self.reset()
            logits = self._forward_and_adapt(images)
        self.batches += 1
        return logits

    def _forward_and_adapt(self, images: Tensor) -> Tensor:
        anchor = None
        if self.config.method == "uncertain":
            with torch.no_grad():
                anchor = self.source(images)
        logits = self.model(images)
        if self.guard is not None:
            reason = self._observe(logits)
            if reason is not None:
                self.reset(reason)
                logits = self.model(images)
                self._observe(logits)  # the first batch of the fresh window
        prediction = logits.detach()
        for step in range(self.config.steps if self.config.learns else 0):
            if step:
                logits = self.model(images)
            loss = self.loss(logits, anchor)
            if loss is None:
                self.skipped += 1
                break
            if not torch.isfinite(loss):  # the parameters have diverged: back to the source, predict with it
                self.reset(f"non-finite loss: {loss.item()}")
                with torch.no_grad():
                    prediction = self.model(images)
                break
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
        if self.config.predicts_after_update:
            with torch.no_grad():
                prediction = self.model(images)
        return prediction.float()

    def _observe(self, logits: Tensor) -> str | None:
        detached = logits.detach()
        return self.guard.observe(pixel_entropy(detached).mean().item(), detached.argmax(1))

    def summary(self) -> dict[str, Any]:
        """Counts for the results: batches seen, optimizer steps, batches without a teaching pixel, resets by kind
        with their reasons."""
        kinds = Counter(reset["reason"].split(":")[0] for reset in self.resets)
        return {"batches": self.batches, "updates": self.updates, "skipped_batches": self.skipped,
                "resets": len(self.resets), "resets_by_kind": dict(kinds), "reset_log": list(self.resets)}
