"""`trustseg predict`: label maps, colour masks, overlays and uncertainty maps for one image or a folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trustseg.engine.checkpoint import load_checkpoint
from trustseg.data.readers import IMAGE_EXTENSIONS, read_image
from trustseg.errors import UserError
from trustseg.engine.inference import InferenceConfig, Predictor, predictor_from_checkpoint
from trustseg.models.factory import model_options
from trustseg.engine.progress import track
from trustseg.engine.rundir import RunDir
from trustseg.engine.uncertainty_maps import MC_DROPOUT, METHODS, UNCERTAINTY, mc_dropout, require_dropout
from trustseg.report.visualize import colorize, heatmap, overlay, save_png


@dataclass(frozen=True)
class PredictConfig:
    """`uncertainty` (one of `trustseg.engine.uncertainty_maps.METHODS`, or None) adds per-pixel maps.

    With "mc-dropout" the map comes from `mc_samples` passes with dropout on (masks seeded by
    `seed`), while the label maps stay the deterministic prediction of the model in eval mode.
    """

    checkpoint: str
    input: str
    out: str
    inference: InferenceConfig = InferenceConfig()
    alpha: float = 0.5
    uncertainty: str | None = None
    mc_samples: int = 8
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.uncertainty is not None and self.uncertainty not in METHODS:
            raise UserError(f"--uncertainty {self.uncertainty!r}: expected one of {', '.join(METHODS)}")
        check_mc_samples(self.mc_samples)


@dataclass
class PredictResult:
    run_dir: Path
    outputs: list[dict[str, Path]] = field(default_factory=list)


def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image file directly inside a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path} does not exist")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise UserError(f"--input {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def check_mc_samples(samples: object) -> None:
    """`--mc-samples` of predict and eval: a positive integer, checked before any work."""
    if not isinstance(samples, int) or samples < 1:
        raise UserError(f"--mc-samples {samples!r}: expected an integer >= 1")


def dropout_fix(model_name: str) -> str:
    """What to do about a checkpoint without dropout: the model's dropout-rate options, if it has any."""
    options = [option for option in model_options(model_name) if "drop" in option]
    if not options:
        return f"model {model_name!r} has no dropout option; use --uncertainty {'|'.join(UNCERTAINTY)} instead"
    example = f"--set model.options.{options[0]}=0.1"
    return f"train with a rate > 0, e.g. {example} ({model_name} options: {', '.join(options)})"


def uncertainty_map(
    config: PredictConfig, predictor: Predictor, images: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """(B, H, W) map of `config.uncertainty`: from `logits` = predictor(images), or new MC-dropout passes."""
    if config.uncertainty == MC_DROPOUT:
        return mc_dropout(predictor, images, samples=config.mc_samples, seed=config.seed).entropy
    return UNCERTAINTY[config.uncertainty](logits.softmax(1))


def run_predict(config: PredictConfig) -> PredictResult:
    checkpoint = load_checkpoint(config.checkpoint)
    images = list_images(config.input)
    predictor = predictor_from_checkpoint(checkpoint, config.inference)
    if config.uncertainty == MC_DROPOUT:  # fail before writing anything
        require_dropout(predictor, dropout_fix(checkpoint.model["name"]))
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "predict", **vars(config)})
    result = PredictResult(run_dir=run_dir.path)
    for path in track(images, total=len(images), description="predict", enabled=config.progress):
        image = read_image(path)
        with torch.inference_mode():
            logits = predictor(image[None])
            uncertainty = uncertainty_map(config, predictor, image[None], logits)[0] if config.uncertainty else None
        labels = logits[0].max(0).indices
        colours = colorize(labels, checkpoint.classes)
        outputs = {
            "image": path,
            "labels": save_png(labels.numpy().astype(np.uint8), run_dir.file(f"labels/{path.stem}.png")),
            "mask": save_png(colours, run_dir.file(f"masks/{path.stem}.png")),
            "overlay": save_png(overlay(image, colours, config.alpha), run_dir.file(f"overlays/{path.stem}.png")),
        }
        if uncertainty is not None:
            values = uncertainty.float().numpy()
            outputs["uncertainty_png"] = save_png(heatmap(values), run_dir.file(f"uncertainty/{path.stem}.png"))
            outputs["uncertainty"] = run_dir.file(f"uncertainty/{path.stem}.npy")
            np.save(outputs["uncertainty"], values)
        result.outputs.append(outputs)
    return result
