"""Turn a trained model into a predictor: raw images in, logits at the input resolution out.

The predictor owns what every caller would otherwise repeat: normalisation with the checkpoint's
mean/std, padding to the model's size divisor (then cropping the logits back), optional resizing of
large inputs, and sliding-window inference with overlap averaging for images larger than the crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trustseg.calibrators.methods import build_calibrator
from trustseg.compress.apply import install_token_reduction, token_step
from trustseg.engine.checkpoint import Checkpoint
from trustseg.engine.devices import autocast
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.models.weights import load_mapped, require_fit
from trustseg.refine.features import FeatureTap
from trustseg.refine.refiner import RefineConfig, Refiner

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InferenceConfig:
    """`mode` "whole" runs the full (padded) image; "slide" tiles it with `crop` windows every `stride`.

    `short_side` resizes the image before inference so its short side has that length, and `scale`
    then multiplies its size (e.g. 2.0 to test a model at twice its training resolution); logits are
    resized back to the input size. `refine` re-decides the uncertain pixels from their neighbours,
    guided by the image (`trustseg.refine`), before any calibrator.
    """

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    short_side: int | None = None
    bf16: bool = False
    scale: float = 1.0
    refine: RefineConfig | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise UserError(f"inference scale {self.scale}: expected a factor > 0")
        if self.mode not in ("whole", "slide"):
            raise UserError(f"inference mode {self.mode!r}: expected 'whole' or 'slide'")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise UserError("slide inference needs crop and stride (e.g. crop=512,512 stride=341,341)")


def pad_to_multiple(images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H and W are multiples of `divisor`."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % divisor, -width % divisor
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    return images


def padded_logits(model: Logits, images: torch.Tensor, divisor: int) -> torch.Tensor:
    """Logits (B, K, H, W) for any H, W: run the model on the padded image and crop back."""
    height, width = images.shape[-2:]
    return model(pad_to_multiple(images, divisor))[..., :height, :width]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering [0, size): every `stride`, the last one flush with the end."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(i * stride, size - crop) for i in range(count)]


def sliding_window_logits(
    model: Logits,
    images: torch.Tensor,
    *,
    crop: tuple[int, int],
    stride: tuple[int, int],
    divisor: int = 1,
) -> torch.Tensor:
    """Average the logits of overlapping `crop` windows; (B, 3, H, W) -> (B, K, H, W)."""
    height, width = images.shape[-2:]
    total = counts = None
    for top in window_starts(height, crop[0], stride[0]):
        for left in window_starts(width, crop[1], stride[1]):
            window = images[..., top : top + crop[0], left : left + crop[1]]
            logits = padded_logits(model, window, divisor).float()
            if total is None:
                total = logits.new_zeros(*logits.shape[:2], height, width)
                counts = logits.new_zeros(1, 1, height, width)
            total[..., top : top + window.shape[-2], left : left + window.shape[-1]] += logits
            counts[..., top : top + window.shape[-2], left : left + window.shape[-1]] += 1
    return total / counts


class Predictor(nn.Module):
    """images uint8 or float in [0, 255], (B, 3, H, W) -> logits float32 (B, K, H, W).

    With a `refiner` the logits are refined (it sees the logits and the images, and with a `feature_tap`
    the model's features too), then with a `calibrator` calibrated (likewise).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        config: InferenceConfig = InferenceConfig(),
        calibrator: nn.Module | None = None,
        refiner: nn.Module | None = None,
        feature_tap: FeatureTap | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.feature_tap = feature_tap  # wraps `model`: its logits with its features appended
        self.config = config
        self.calibrator = calibrator
        self.refiner = refiner
        self.divisor = int(getattr(model, "size_divisor", 1))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        return (images.float() - self.mean) / self.std

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the normalised, resized input the model runs on (before padding to its stride)."""
        x = self.normalise(images)
        scale = self.config.scale * (self.config.short_side / min(x.shape[-2:]) if self.config.short_side else 1.0)
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        x = self.prepare(images)
        network = self.model if self.feature_tap is None else self.feature_tap
        with autocast(x.device, bf16=self.config.bf16):
            if self.config.mode == "slide":
                logits = sliding_window_logits(
                    network, x, crop=self.config.crop, stride=self.config.stride, divisor=self.divisor
                )
            else:
                logits = padded_logits(network, x, self.divisor)
        logits = logits.float()
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        features = None
        if self.feature_tap is not None:
            classes = self.feature_tap.num_classes
            logits, features = logits[:, :classes], logits[:, classes:]
        if self.refiner is not None:
            logits = self.refiner(logits, images, features)
        return logits if self.calibrator is None else self.calibrator(logits, images)


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's model, weights loaded, its token reduction (if any) installed, in eval mode.

    The recipe is built on the meta device first and the weights checked against it (names and shapes):
    a damaged recipe (a flipped ``depth``) fails in one line before any memory is allocated for it.
    """
    name, options = checkpoint.model["name"], checkpoint.model.get("options", {})
    source = checkpoint.source

    def build() -> nn.Module:
        try:
            return build_model(name, num_classes=checkpoint.classes.num_classes, **options)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:  # option values the builder refuses
            raise UserError(f"{source}: model {name!r} cannot be built with options {options} "
                            f"({_first_line(error)})") from None

    with torch.device("meta"):
        require_fit(build(), checkpoint.state_dict, source=f"the weights of {source}")
    model = build()
    model.load_state_dict(checkpoint.state_dict)
    step = token_step(checkpoint)
    if step is not None:  # token merging recorded by trustseg compress: part of how this model runs
        install_token_reduction(model, step, policy_state=checkpoint.token_policy, source=source)
    return model.eval()


def calibrator_from_checkpoint(checkpoint: Checkpoint) -> nn.Module | None:
    """The checkpoint's fitted calibrator, or None."""
    if checkpoint.calibrator is None:
        return None
    method = checkpoint.calibrator["method"]
    try:
        calibrator = build_calibrator(method, checkpoint.classes.num_classes)
    except UserError as error:
        raise UserError(f"{checkpoint.source}: {error}") from None
    source = f"the {method} calibrator of {checkpoint.source}"
    load_mapped(calibrator, checkpoint.calibrator["state_dict"], source=source)
    return calibrator.eval().requires_grad_(False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def predictor_from_checkpoint(
    checkpoint: Checkpoint,
    config: InferenceConfig = InferenceConfig(),
    *,
    calibrated: bool = True,
    device: torch.device | str = "cpu",
) -> Predictor:
    """The checkpoint's model behind `config`'s inference, with its calibrator unless `calibrated` is False,
    on `device` (it takes images on that device)."""
    calibrator = calibrator_from_checkpoint(checkpoint) if calibrated else None
    refiner = None if config.refine is None else Refiner(config.refine)
    model = model_from_checkpoint(checkpoint)
    uses_features = refiner is not None and config.refine.uses_features
    tap = FeatureTap(model, checkpoint.classes.num_classes) if uses_features else None
    predictor = Predictor(model, checkpoint.mean, checkpoint.std, config, calibrator, refiner, tap)
    return predictor.to(device).eval()
