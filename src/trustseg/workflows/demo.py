"""`trustseg demo`: the main job on the embedded default — generate the procedural synthetic data,
train a small U-Net, evaluate it with every Core metric, and write prediction overlays."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.devices import resolve_device
from trustseg.data.spec import load_dataset
from trustseg.engine.inference import InferenceConfig, predictor_from_checkpoint
from trustseg.training.config import load_train_config
from trustseg.training.loop import BEST, LAST, TrainResult, train
from trustseg.report.visualize import prediction_panel, save_png
from trustseg.workflows.evaluation import EvalConfig, EvalResult, run_eval

DEMO_RECIPE = files("trustseg") / "recipes" / "demo_synthetic.yaml"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    overrides: tuple[str, ...] = ()  # key=value changes to the training recipe (e.g. "steps=50")
    num_overlays: int = 6
    device: str = "auto"
    progress: bool = True


@dataclass
class DemoResult:
    run_dir: Path
    train: TrainResult
    eval: EvalResult
    overlays: list[Path]


def write_overlays(checkpoint_path: Path, data: str, out: Path, count: int,
                   inference: InferenceConfig = InferenceConfig(), device: str = "cpu") -> list[Path]:
    """image | ground truth | prediction panels for the first `count` validation images."""
    checkpoint = load_checkpoint(checkpoint_path)
    device = resolve_device(device)
    predictor = predictor_from_checkpoint(checkpoint, inference, device=device)
    dataset = load_dataset(data, split="val")
    paths = []
    for index in range(min(count, len(dataset))):
        sample = dataset[index]
        with torch.inference_mode():
            pred = predictor(sample["image"][None].to(device))[0].max(0).indices.cpu()
        panel = prediction_panel(sample["image"], sample["mask"], pred, checkpoint.classes)
        paths.append(save_png(panel, out / f"overlay_{index:03d}.png"))
    return paths


def run_demo(config: DemoConfig = DemoConfig()) -> DemoResult:
    out = Path(config.out)
    train_dir = out / "train"
    train_config = load_train_config(DEMO_RECIPE, [f"out={train_dir}", f"device={config.device}", *config.overrides])
    # Re-running the demo into the same folder continues (or simply reuses) the earlier run.
    trained = train(train_config, resume=(train_dir / LAST).exists(), progress=config.progress)
    best = train_dir / BEST
    # Evaluated as training validated: in the recipe's precision and batch size (bf16 autocast is
    # ~1.3x faster and changes well under 1% of the decisions).
    inference = InferenceConfig(bf16=train_config.bf16)
    evaluated = run_eval(
        EvalConfig(checkpoint=str(best), data=train_config.data.train, split="val", out=str(out / "eval"),
                   batch_size=train_config.data.val_batch_size, inference=inference, device=config.device,
                   progress=config.progress)
    )
    overlays = write_overlays(best, train_config.data.train, out / "overlays", config.num_overlays, inference,
                              config.device)
    return DemoResult(run_dir=out, train=trained, eval=evaluated, overlays=overlays)
