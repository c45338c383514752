"""`trustseg predict`: label maps, colour masks and overlays for one image or a folder of images."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trustseg.checkpoint import load_checkpoint
from trustseg.data.readers import IMAGE_EXTENSIONS, read_image
from trustseg.errors import UserError
from trustseg.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.progress import track
from trustseg.rundir import RunDir
from trustseg.visualize import colorize, overlay, save_png


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str
    input: str
    out: str
    inference: InferenceConfig = InferenceConfig()
    alpha: float = 0.5
    progress: bool = True


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


def run_predict(config: PredictConfig) -> PredictResult:
    checkpoint = load_checkpoint(config.checkpoint)
    images = list_images(config.input)
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "predict", **vars(config)})
    predictor = predictor_from_checkpoint(checkpoint, config.inference)
    result = PredictResult(run_dir=run_dir.path)
    for path in track(images, total=len(images), description="predict", enabled=config.progress):
        image = read_image(path)
        with torch.inference_mode():
            labels = predictor(image[None])[0].max(0).indices
        colours = colorize(labels, checkpoint.classes)
        result.outputs.append(
            {
                "image": path,
                "labels": save_png(labels.numpy().astype(np.uint8), run_dir.file(f"labels/{path.stem}.png")),
                "mask": save_png(colours, run_dir.file(f"masks/{path.stem}.png")),
                "overlay": save_png(overlay(image, colours, config.alpha), run_dir.file(f"overlays/{path.stem}.png")),
            }
        )
    return result
