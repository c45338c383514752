"""The refinement step behind a predictor: logits and images in, refined logits out.

`Refiner` has a calibrator's signature, `(logits (B, K, H, W), images (B, 3, H, W)) -> logits`, plus the
model's features (B, C, H, W) when its guide uses them (`features.FeatureTap` gives them), so the
`Predictor` applies it to the logits at the input resolution before any calibrator; every command that
builds its predictor with `predictor_from_checkpoint` (eval, robustness, calibrate, predict) gets it
from `InferenceConfig.refine`. A calibrator fitted by `trustseg calibrate` with refinement on was fitted
on refined logits, so it belongs with the same refinement.

The output is the log of the refined probabilities: a logit map (softmax gives those probabilities back),
so calibration metrics, calibrators and uncertainty measures apply unchanged. At confident pixels it is
exactly `log_softmax(logits)`: the same probabilities, the same decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.refine.propagation import PAMR_DILATIONS, PAMR_ITERATIONS, refine_probabilities, uncertain_pixels

GUIDES = ("image", "features", "both")


@dataclass(frozen=True)
class RefineConfig:
    """PAMR propagation over `iterations` steps at `dilations`, re-deciding in each image the `percent`
    % of pixels with the lowest top-class probability, over affinities from the `guide`: the image, the
    model's features, or both; `tile_rows` bounds the affinity memory (None: whole image)."""

    percent: float = 20.0
    iterations: int = PAMR_ITERATIONS
    dilations: tuple[int, ...] = PAMR_DILATIONS
    tile_rows: int | None = None
    guide: str = "image"

    def __post_init__(self) -> None:
        if not 0 < self.percent <= 100:
            raise UserError(f"--refine-q {self.percent}: expected the percentage of pixels to re-decide, in (0, 100]")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise UserError(f"--refine-iters {self.iterations}: expected an integer >= 1")
        if not self.dilations or any(not isinstance(d, int) or d < 1 for d in self.dilations):
            raise UserError(f"refine dilations {self.dilations}: expected positive integers")
        if self.tile_rows is not None and self.tile_rows < 1:
            raise UserError(f"refine tile_rows {self.tile_rows}: expected an integer >= 1 or None")
        if self.guide not in GUIDES:
            raise UserError(f"--refine-guide {self.guide!r}: expected one of {', '.join(GUIDES)}")

    @property
    def uses_features(self) -> bool:
        return self.guide != "image"


def refine_logits(logits: Tensor, images: Tensor, config: RefineConfig, features: Tensor | None = None) -> Tensor:
    """(B, K, H, W) logits, (B, 3, H, W) images, (B, C, H, W) features when the guide uses them -> (B, K, H, W)
    log refined probabilities (float32); the pixels outside the uncertain share equal `log_softmax(logits)`
    exactly."""
    if config.uses_features and features is None:
        raise ValueError(f"refinement guided by {config.guide} needs the model's features")
    guides = {"image": [images], "features": [features], "both": [images, features]}[config.guide]
    log_probabilities = logits.float().log_softmax(dim=1)
    probabilities = log_probabilities.exp()
    uncertain = uncertain_pixels(probabilities, config.percent)
    refined = refine_probabilities(probabilities, guides, uncertain, iterations=config.iterations,
                                   dilations=config.dilations, tile_rows=config.tile_rows)
    tiny = torch.finfo(refined.dtype).tiny
    return torch.where(uncertain[:, None], refined.clamp_min(tiny).log(), log_probabilities)


class Refiner(nn.Module):
    """`refine_logits` as a module, timing itself: `ms_per_image` is the mean wall time per image of the
    calls since the last `reset` (CUDA work is waited for, so the time is the refinement's own)."""

    def __init__(self, config: RefineConfig) -> None:
        super().__init__()
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.seconds, self.images = 0.0, 0

    @property
    def ms_per_image(self) -> float | None:
        return 1000 * self.seconds / self.images if self.images else None

    def forward(self, logits: Tensor, images: Tensor, features: Tensor | None = None) -> Tensor:
        _synchronise(logits.device)
        start = time.perf_counter()
        refined = refine_logits(logits, images, self.config, features)
        _synchronise(logits.device)
        self.seconds += time.perf_counter() - start
        self.images += logits.shape[0]
        return refined


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def refinement_cost(predictor: object) -> dict[str, float]:
    """{"refine_ms_per_image": ms} of the predictor's refiner since its last reset; {} without one."""
    refiner = getattr(predictor, "refiner", None)
    if refiner is None or refiner.ms_per_image is None:
        return {}
    return {"refine_ms_per_image": refiner.ms_per_image}
