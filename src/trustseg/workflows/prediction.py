"""`trustseg predict`: label maps, colour masks, overlays and uncertainty maps for one image or a folder.

Outputs keep the input folder's subfolders and are named by stem (``a.jpg`` -> ``labels/a.png``);
stems that would collide keep their suffix. Label PNGs are 8-bit, or 16-bit above 255 classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections import Counter
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from trustseg.engine.checkpoint import Checkpoint, atomic_write, load_checkpoint
from trustseg.engine.devices import resolve_device
from trustseg.data.base import ClassInfo, mask_dtype
from trustseg.data.readers import IMAGE_EXTENSIONS, read_image
from trustseg.errors import UserError
from trustseg.engine.inference import InferenceConfig, Predictor, predictor_from_checkpoint
from trustseg.models.factory import model_options
from trustseg.engine.progress import track
from trustseg.engine.rundir import RunDir
from trustseg.engine.uncertainty_maps import MC_DROPOUT, METHODS, UNCERTAINTY, mc_dropout, require_dropout
from trustseg.report.pages import PREDICTIONS_FILE, write_run_report
from trustseg.report.visualize import colorize, heatmap, overlay, save_png


@dataclass(frozen=True)
class PredictConfig:
    """`uncertainty` (one of `trustseg.engine.uncertainty_maps.METHODS`, or None) adds per-pixel maps.

    With "mc-dropout" the map comes from `mc_samples` passes with dropout on (masks seeded by
    `seed`), while the label maps stay the deterministic prediction of the model in eval mode.
    The model is the `checkpoint`'s, or the ONNX graph `onnx` written by `trustseg export` (exactly one).
    """

    checkpoint: str | None
    input: str
    out: str
    inference: InferenceConfig = InferenceConfig()
    alpha: float = 0.5
    uncertainty: str | None = None
    mc_samples: int = 8
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    onnx: str | None = None
    report: bool = True  # write predictions.json's summary as report.md / report.html at the end

    def __post_init__(self) -> None:
        if (self.checkpoint is None) == (self.onnx is None):
            raise UserError("predict needs exactly one model: --checkpoint FILE or --onnx FILE")
        if self.uncertainty is not None and self.uncertainty not in METHODS:
            raise UserError(f"--uncertainty {self.uncertainty!r}: expected one of {', '.join(METHODS)}")
        check_mc_samples(self.mc_samples)


@dataclass
class PredictResult:
    run_dir: Path
    outputs: list[dict[str, Path]] = field(default_factory=list)


def list_images(path: str | Path, *, exclude: str | Path | None = None, option: str = "--input") -> list[Path]:
    """One image file, or every image file in a folder and its subfolders (sorted), except under `exclude`
    (the output folder, when it lies inside the input folder); errors name the command-line `option`."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"{option} {path} does not exist")
    skip = None if exclude is None else Path(exclude).resolve()
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not images:
        raise UserError(f"{option} {path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return images


def output_names(images: list[Path], input_path: str | Path) -> list[PurePath]:
    """Output name (no suffix) of each image: its path relative to the input folder without the suffix.

    Images whose names would collide (``a.png`` and ``a.jpg``) keep their suffix (``a.png``, ``a.jpg``,
    to which the outputs add theirs: ``a.jpg.png``), so no output overwrites another.
    """
    base = Path(input_path)
    relative = [PurePath(image.name) if base.is_file() else PurePath(image.relative_to(base)) for image in images]
    stems = [r.with_suffix("") for r in relative]
    counts = Counter(str(stem).lower() for stem in stems)  # case-insensitive file systems collide too
    names = [r if counts[str(stem).lower()] > 1 else stem for r, stem in zip(relative, stems)]
    seen: dict[str, Path] = {}
    for image, name in zip(images, names):  # only contrived names get here, e.g. a.png, a.jpg and a.jpg.png
        if str(name).lower() in seen:
            raise UserError(f"--input {image} and {seen[str(name).lower()]} would write the same outputs "
                            f"({name}.png); rename one of them")
        seen[str(name).lower()] = image
    return names


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


def load_predictor(config: PredictConfig, checkpoint: Checkpoint | None,
                   device: torch.device) -> tuple[Predictor, ClassInfo]:
    """The predictor of `checkpoint`, or else of `config`'s ONNX graph, on `device`, and the classes it
    predicts; with MC dropout asked for, fails before anything is written unless the model has dropout."""
    if checkpoint is None:
        from trustseg.export.runtime import onnx_predictor

        predictor, classes = onnx_predictor(config.onnx, config.inference, device=device)
        fix = "an exported ONNX graph runs without dropout; use --checkpoint, or --uncertainty entropy|msp|margin"
    else:
        predictor = predictor_from_checkpoint(checkpoint, config.inference, device=device)
        classes, fix = checkpoint.classes, dropout_fix(checkpoint.model["name"])
    if config.uncertainty == MC_DROPOUT:
        require_dropout(predictor, fix)
    return predictor, classes


def run_predict(config: PredictConfig) -> PredictResult:
    checkpoint = load_checkpoint(config.checkpoint) if config.checkpoint is not None else None
    images = list_images(config.input, exclude=config.out)
    names = output_names(images, config.input)
    device = resolve_device(config.device)
    predictor, classes = load_predictor(config, checkpoint, device)
    run_dir = RunDir(config.out)
    run_dir.write_config({"command": "predict", **vars(config)})
    result = PredictResult(run_dir=run_dir.path)
    summaries: list[dict[str, Any]] = []
    labels_dtype = mask_dtype(classes.num_classes)  # 16-bit PNGs above 255 classes
    for path, name in track(list(zip(images, names)), total=len(images), description="predict",
                            enabled=config.progress):
        image = read_image(path)
        batch = image[None].to(device)
        with torch.inference_mode():
            logits = predictor(batch)
            uncertainty = uncertainty_map(config, predictor, batch, logits)[0].cpu() if config.uncertainty else None
        labels = logits[0].max(0).indices.cpu()
        colours = colorize(labels, classes)
        outputs = {
            "image": path,
            "labels": save_png(labels.numpy().astype(labels_dtype), run_dir.file(f"labels/{name}.png")),
            "mask": save_png(colours, run_dir.file(f"masks/{name}.png")),
            "overlay": save_png(overlay(image, colours, config.alpha), run_dir.file(f"overlays/{name}.png")),
        }
        if uncertainty is not None:
            values = uncertainty.float().numpy()
            outputs["uncertainty_png"] = save_png(heatmap(values), run_dir.file(f"uncertainty/{name}.png"))
            outputs["uncertainty"] = run_dir.file(f"uncertainty/{name}.npy")
            atomic_write(outputs["uncertainty"], lambda handle: np.save(handle, values))
        result.outputs.append(outputs)
        summaries.append(image_summary(name, labels, uncertainty, outputs, run_dir.path, classes.num_classes))
    run_dir.write_json(PREDICTIONS_FILE, {"class_names": list(classes.names), "uncertainty": config.uncertainty,
                                          "images": summaries})
    if config.report:
        write_run_report(run_dir.path)
    return result


def image_summary(name: PurePath, labels: torch.Tensor, uncertainty: torch.Tensor | None,
                  outputs: dict[str, Path], run_dir: Path, num_classes: int) -> dict[str, Any]:
    """One image's line of predictions.json: size, predicted pixels per class, mean uncertainty and its
    output files (relative to the run directory), so the report can rank images without reading the maps."""
    return {
        "name": name.as_posix(),
        "size": list(labels.shape),
        "class_pixels": torch.bincount(labels.flatten(), minlength=num_classes).tolist(),
        "mean_uncertainty": None if uncertainty is None else float(uncertainty.double().mean()),
        "files": {key: Path(path).relative_to(run_dir).as_posix() for key, path in outputs.items()
                  if key in ("overlay", "uncertainty_png")},
    }
