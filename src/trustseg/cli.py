"""The `trustseg` command line: parses options, calls a workflow, prints tables.

User errors (UserError) end with one line on stderr and exit status 2; bugs keep their traceback (1).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from trustseg.errors import UserError

app = typer.Typer(
    help="Trustworthy and efficient semantic segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Speed benchmarks, measured side by side with the alternative.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
experiment_app = typer.Typer(help="Experiments that test a paper's claim on your data, end to end.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")
# No markup: all it prints is data (paths, specs, class names), where "[x]" is text, not a style.
console = Console(markup=False, soft_wrap=True)  # paths are printed whole, never broken across lines

DEVICE_HELP = "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N; under torchrun each process takes cuda:LOCAL_RANK"
DATA_HELP = ("Data spec: synthetic | camvid:PATH | cityscapes:PATH | ade20k:PATH | voc:PATH | foodseg103:PATH | "
             "folder:PATH, optionally #split=val,...; several sources as SPEC+SPEC (training weights: #ratio=1:1 on "
             "the last part)")


def parse_pair(value: Optional[str], name: str) -> Optional[tuple[int, int]]:
    """'512' or '512,1024' -> (H, W)."""
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        raise UserError(f"{name} {value!r}: expected an integer or 'H,W'") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"{name} {value!r}: expected a positive integer or 'H,W'")
    return parts[0], parts[1]


def inference_config(mode: str, crop: Optional[str], stride: Optional[str], short_side: Optional[int], bf16: bool,
                     scale: float, refine: bool = False, refine_iters: int = 10, refine_q: float = 20.0,
                     refine_guide: str = "image"):
    from trustseg.engine.inference import InferenceConfig
    from trustseg.refine.refiner import RefineConfig

    # checked even without --refine
    refinement = RefineConfig(percent=refine_q, iterations=refine_iters, guide=refine_guide)
    return InferenceConfig(
        mode=mode,
        crop=parse_pair(crop, "--crop"),
        stride=parse_pair(stride, "--stride"),
        short_side=short_side,
        bf16=bf16,
        scale=scale,
        refine=refinement if refine else None,
    )


CheckpointOption = typer.Option(..., "--checkpoint", help="Checkpoint file written by trustseg train.")
DataOption = typer.Option(..., "--data", help=DATA_HELP)
ValSplitOption = typer.Option(None, "--split", help="Split (default: the spec's #split, else val).")
MaxImagesOption = typer.Option(None, "--max-images", help="Use only the first N images.")
BatchSizeOption = typer.Option(1, "--batch-size", min=1)
ModeOption = typer.Option("whole", "--mode", help="whole: full image (padded); slide: sliding window.")
CropOption = typer.Option(None, "--crop", help="Sliding-window crop 'H,W' (mode slide).")
StrideOption = typer.Option(None, "--stride", help="Sliding-window stride 'H,W' (mode slide).")
ShortSideOption = typer.Option(None, "--short-side", help="Resize images to this short side before inference.")
ScaleOption = typer.Option(1.0, "--scale", min=0.01, help="Resize images by this factor before inference (after "
                           "--short-side), e.g. 2 to test at twice the training resolution.")
Bf16Option = typer.Option(False, "--bf16", help="bfloat16 autocast inference.")
ProgressOption = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
McSamplesOption = typer.Option(8, "--mc-samples", help="Stochastic passes with dropout on for the MC-dropout measures.")
ReportOption = typer.Option(True, "--report/--no-report", help="Write report.html and report.md at the end.")
McSeedOption = typer.Option(0, "--seed", help="Seed of the MC-dropout masks (the same for every batch).")
DeviceOption = typer.Option("auto", "--device", help="Where the model runs: " + DEVICE_HELP + ".")
RefineOption = typer.Option(False, "--refine/--no-refine", help="Re-decide the least confident pixels from their "
                            "neighbours, guided by the image (PAMR propagation, training-free); confident pixels never change.")
RefineItersOption = typer.Option(10, "--refine-iters", help="Propagation steps of --refine.")
RefineQOption = typer.Option(20.0, "--refine-q", help="Percentage of each image's pixels (lowest top-class "
                             "probability) that --refine re-decides, in (0, 100].")
RefineGuideOption = typer.Option("image", "--refine-guide", help="What the affinities of --refine compare: image "
                                 "(colour) | features (the model's classifier input) | both.")


def print_eval_tables(metrics: dict, class_names) -> None:
    from trustseg.report.tables import calibration_rows, per_class_rows, rich_table, summary_rows

    console.print(rich_table(*per_class_rows(metrics, class_names), title="per class (%)"))
    console.print(rich_table(*summary_rows(metrics), title="summary (%)"))
    calibration = calibration_rows(metrics)
    if calibration[0]:
        console.print(rich_table(*calibration, title="calibration and error detection (%; NLL, Brier raw)"))


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory to write."),
    overrides: list[str] = typer.Option([], "--set", help="Change the training recipe: key=value (e.g. steps=100)."),
    num_overlays: int = typer.Option(6, "--overlays", min=0, help="Number of prediction overlays to write."),
    device: str = DeviceOption,
    progress: bool = ProgressOption,
) -> None:
    """The main job on the embedded default: synthetic data -> train a small U-Net -> eval -> overlays.

    Example: trustseg demo --out runs/demo
    """
    from trustseg.workflows.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=str(out), overrides=tuple(overrides), num_overlays=num_overlays, device=device,
                                 progress=progress))
    trained = result.train
    console.print(
        f"trained {trained.step} steps in {trained.elapsed_s / 60:.1f} min; best val mIoU "
        f"{100 * trained.best_miou:.2f}% at step {trained.best_step}"
    )
    print_eval_tables(result.eval.metrics, result.eval.classes.names)
    console.print(f"overlays: {result.run_dir / 'overlays'} ({len(result.overlays)} images)")
    console.print(f"run directory: {result.run_dir}")


@app.command("train")
def train_command(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML training recipe (see configs/)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: key=value (e.g. optim.lr=1e-3)."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data spec (overrides data.train). " + DATA_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (overrides out)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    device: Optional[str] = typer.Option(None, "--device", help="Overrides the recipe's device: " + DEVICE_HELP + "."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training forward pass (config key compile)."),
    progress: bool = ProgressOption,
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html and report.md at the end "
                                "(config key report)."),
) -> None:
    """Train a model; under `torchrun --nproc_per_node=N` the same command uses DDP.

    Example: trustseg train --config configs/camvid_unet.yaml --data camvid:data/camvid --out runs/unet
    """
    from trustseg.engine.distributed import is_main_process
    from trustseg.training.config import load_train_config
    from trustseg.training.loop import train

    extra = [f"data.train={data}"] if data else []
    extra += [f"out={out}"] if out else []
    extra += [f"device={device}"] if device else []
    extra += ["compile=true"] if compile else []
    extra += ["report=false"] if not report else []
    result = train(load_train_config(config, [*overrides, *extra]), resume=resume, progress=progress)
    if is_main_process():
        console.print(
            f"{result.step} steps in {result.elapsed_s / 60:.1f} min (stopped by {result.stopped_by}); "
            f"best val mIoU {100 * result.best_miou:.2f}% at step {result.best_step}"
        )
        print_eval_tables(result.metrics, result.metrics.get("class_names", []))
        console.print(f"run directory: {result.run_dir}")


@app.command("eval")
def eval_command(
    checkpoint: Path = CheckpointOption,
    data: str = DataOption,
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    split: Optional[str] = ValSplitOption,
    batch_size: int = BatchSizeOption,
    max_images: Optional[int] = MaxImagesOption,
    boundary_iou: bool = typer.Option(True, "--boundary-iou/--no-boundary-iou", help="Also compute Boundary IoU."),
    calibration: bool = typer.Option(True, "--calibration/--no-calibration",
                                     help="Also compute ECE, MCE, aECE, cwECE, NLL, Brier (all pixels and boundary band)."),
    uncertainty: str = typer.Option("msp", "--uncertainty", help="Uncertainty measures scored as error detectors "
                                    "(AUROC, AURC): comma-separated msp, entropy, margin, mc-dropout, "
                                    "mutual-information, or none."),
    mc_samples: int = McSamplesOption,
    seed: int = McSeedOption,
    per_image: bool = typer.Option(False, "--per-image", help="Also write per_image_confusion.npy (one KxK matrix "
                                   "per image: N*K*K*8 bytes), which trustseg report needs for bootstrap intervals."),
    report: bool = ReportOption,
    gallery: int = typer.Option(4, "--gallery", min=0, help="Images in the report's prediction gallery (image, "
                                "ground truth, prediction, error, uncertainty); 0 for none."),
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = Bf16Option,
    refine: bool = RefineOption,
    refine_iters: int = RefineItersOption,
    refine_q: float = RefineQOption,
    refine_guide: str = RefineGuideOption,
    device: str = DeviceOption,
    progress: bool = ProgressOption,
) -> None:
    """Evaluate a checkpoint: mIoU, mAcc, aAcc, mDice, fwIoU, Boundary IoU, calibration, error detection.

    Under `torchrun --nproc_per_node=N` each process evaluates a shard and rank 0 writes the results.

    Example: trustseg eval --checkpoint runs/unet/best.pt --data camvid:data/camvid --out runs/unet-eval
    """
    from trustseg.engine.distributed import is_main_process
    from trustseg.workflows.evaluation import EvalConfig, parse_measures, run_eval

    result = run_eval(
        EvalConfig(
            checkpoint=str(checkpoint),
            data=data,
            out=str(out),
            split=split,
            batch_size=batch_size,
            max_images=max_images,
            inference=inference_config(mode, crop, stride, short_side, bf16, scale, refine, refine_iters, refine_q,
                                       refine_guide),
            boundary_iou=boundary_iou,
            calibration=calibration,
            uncertainty=parse_measures(uncertainty),
            mc_samples=mc_samples,
            seed=seed,
            device=device,
            progress=progress,
            per_image=per_image,
            report=report,
            gallery=gallery,
        )
    )
    if is_main_process():
        print_eval_tables(result.metrics, result.classes.names)
        console.print(f"run directory: {result.run_dir}")


@app.command("predict")
def predict_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint file written by trustseg train "
                                              "(or --onnx)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX model written by trustseg export (instead of "
                                        "--checkpoint); needs onnxruntime."),
    input: Path = typer.Option(..., "--input", help="An image file or a folder of images."),
    out: Path = typer.Option(..., "--out", help="Run directory to write."),
    alpha: float = typer.Option(0.5, "--alpha", min=0.0, max=1.0, help="Overlay opacity of the colour mask."),
    uncertainty: Optional[str] = typer.Option(
        None, "--uncertainty", help="entropy | msp | margin | mc-dropout: also write uncertainty/*.npy and *.png."
    ),
    mc_samples: int = McSamplesOption,
    seed: int = McSeedOption,
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = Bf16Option,
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    report: bool = ReportOption,
) -> None:
    """Predict label maps, colour masks, overlays and (optionally) per-pixel uncertainty maps.

    Example: trustseg predict --checkpoint runs/unet/best.pt --input photos/ --out runs/pred --uncertainty entropy
    """
    from trustseg.workflows.prediction import PredictConfig, run_predict

    result = run_predict(
        PredictConfig(
            checkpoint=None if checkpoint is None else str(checkpoint),
            onnx=None if onnx is None else str(onnx),
            input=str(input),
            out=str(out),
            inference=inference_config(mode, crop, stride, short_side, bf16, scale),
            alpha=alpha,
            uncertainty=uncertainty,
            mc_samples=mc_samples,
            seed=seed,
            device=device,
            progress=progress,
            report=report,
        )
    )
    folders = "labels/, masks/, overlays/" + (", uncertainty/" if uncertainty else "")
    console.print(f"{len(result.outputs)} image(s) -> {folders} in {result.run_dir}")


@app.command("export")
def export_command(
    checkpoint: Path = CheckpointOption,
    out: Path = typer.Option(..., "--out", help="The model file to write, e.g. model.onnx (a report "
                             "<name>.export.json is written beside it)."),
    format: str = typer.Option("onnx", "--format", help="onnx (the only format so far)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 14..23 (default 18: what torch's "
                                        "exporter builds)."),
    logits_only: bool = typer.Option(False, "--logits-only", help="Export the raw logits, without the "
                                     "checkpoint's calibrator."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, else the TorchScript tracer) | dynamo | "
                                 "torchscript."),
    check_images: Optional[Path] = typer.Option(None, "--check-images", help="An image or folder: also check the "
                                                "graph against torch on (up to 8 of) these images."),
    device: str = DeviceOption,
) -> None:
    """Export the checkpoint's predictor (normalisation, padding, calibrator) to ONNX and check it against torch.

    Example: trustseg export --checkpoint runs/unet/best.pt --format onnx --out unet.onnx
    """
    from trustseg.workflows.export import ExportConfig, run_export, summary_lines

    options = {} if opset is None else {"opset": opset}
    result = run_export(ExportConfig(checkpoint=str(checkpoint), out=str(out), format=format, logits_only=logits_only,
                                     exporter=exporter, device=device, **options,
                                     check_images=None if check_images is None else str(check_images)))
    for line in summary_lines(result):
        console.print(line)


CorruptionsOption = typer.Option("all", "--corruptions", help="all | common | noise | blur | weather | digital | extra | NAME,NAME,...")
SeveritiesOption = typer.Option("1-5", "--severities", help="Severities: 1-5, 3 or 1,3,5.")
ResumeOption = typer.Option(False, "--resume", help="Continue the interrupted run in --out (same settings): what it "
                            "finished is kept and skipped; more corruptions or severities may be added.")


@app.command("robustness")
def robustness_command(
    checkpoint: Path = CheckpointOption,
    data: str = DataOption,
    out: Path = typer.Option(..., "--out", help="Run directory."),
    corruptions: str = CorruptionsOption,
    severities: str = SeveritiesOption,
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="robustness.json of a reference model: adds CE and mCE."),
    split: Optional[str] = ValSplitOption,
    max_images: Optional[int] = MaxImagesOption,
    batch_size: int = BatchSizeOption,
    num_workers: int = typer.Option(0, "--workers", min=0, help="DataLoader workers that corrupt images in parallel."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-image corruption randomness."),
    boundary_iou: bool = typer.Option(False, "--boundary-iou/--no-boundary-iou", help="Also compute Boundary IoU."),
    calibration: bool = typer.Option(True, "--calibration/--no-calibration",
                                     help="Also compute calibration metrics and msp error detection per condition."),
    image_quality: bool = typer.Option(True, "--image-quality/--no-image-quality", help="Also measure the corrupted "
                                       "images' quality per condition (PSNR, SSIM, noise, sharpness, contrast, "
                                       "colourfulness) and how well each predicts mIoU and ECE."),
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = Bf16Option,
    refine: bool = RefineOption,
    refine_iters: int = RefineItersOption,
    refine_q: float = RefineQOption,
    refine_guide: str = RefineGuideOption,
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
    report: bool = ReportOption,
) -> None:
    """mIoU on clean data and under every corruption x severity; relative robustness, mCE vs a baseline.

    Example: trustseg robustness --checkpoint runs/unet/best.pt --data camvid:data/camvid --corruptions common --severities 3,5 --out runs/unet-robustness
    """
    from trustseg.engine.distributed import is_main_process
    from trustseg.report.tables import rich_table
    from trustseg.robustness.corruptions import parse_corruptions, parse_severities
    from trustseg.workflows.robustness import RobustnessConfig, corruption_rows, run_robustness, summary_rows

    config = RobustnessConfig(
        checkpoint=str(checkpoint), data=data, out=str(out), corruptions=parse_corruptions(corruptions),
        severities=parse_severities(severities), split=split, baseline=None if baseline is None else str(baseline),
        max_images=max_images, batch_size=batch_size, num_workers=num_workers, seed=seed, boundary_iou=boundary_iou,
        calibration=calibration, image_quality=image_quality,
        inference=inference_config(mode, crop, stride, short_side, bf16, scale, refine, refine_iters, refine_q,
                                   refine_guide),
        device=device, progress=progress, resume=resume, report=report,
    )
    result = run_robustness(config)
    if is_main_process():
        console.print(rich_table(*corruption_rows(result.summary, result.conditions, config.severities),
                                 title="mIoU (%) per corruption and severity"))
        console.print(rich_table(*summary_rows(result.summary), title="robustness summary (%)"))
        console.print(f"run directory: {result.run_dir}")


@app.command("adapt")
def adapt_command(
    checkpoint: Path = CheckpointOption,
    data: str = DataOption,
    out: Path = typer.Option(..., "--out", help="Run directory."),
    method: str = typer.Option("tent", "--method", help="tent: entropy of every pixel | reliable: only pixels with "
                               "entropy < E0 teach | uncertain: entropy of the pixels >= E0, confident ones anchored "
                               "to the source prediction | norm: test-batch BatchNorm statistics, no update; several "
                               "as norm,tent,reliable,... are compared on the same images."),
    adapt_mode: str = typer.Option("online", "--mode", help="online: the state carries over the images of a "
                                   "condition | episodic: reset to the source weights before every batch (every "
                                   "image with --batch-size 1)."),
    corruptions: str = CorruptionsOption,
    severities: str = SeveritiesOption,
    optimizer: str = typer.Option("adam", "--optimizer", help="adam | sgd (momentum 0.9)."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of the adaptation steps."),
    steps: int = typer.Option(1, "--steps", help="Optimizer steps per batch."),
    predict: str = typer.Option("auto", "--predict", help="before | after the update; auto: before online "
                                "(TENT), after episodic."),
    reliable_fraction: float = typer.Option(0.4, "--reliable-fraction", help="E0 = this x ln K (EATA: 0.4)."),
    weighting: str = typer.Option("hard", "--weighting", help="reliable: hard | eata (weight exp(E0 - H))."),
    anchor_weight: float = typer.Option(1.0, "--anchor-weight", help="uncertain: weight of the anchor KL term."),
    bn_prior: float = typer.Option(0.0, "--bn-prior", help="BatchNorm normalises with the source statistics counted as "
                                   "this many images mixed with the batch's (Schneider et al. 2020); 0: the batch's "
                                   "alone (TENT)."),
    guard: bool = typer.Option(True, "--guard/--no-guard", help="Online: reset when entropy or the predicted classes "
                               "collapse, or entropy rises."),
    guard_window: int = typer.Option(8, "--guard-window", help="Batches per window of the guard."),
    max_class_share: float = typer.Option(0.95, "--max-class-share", help="Guard: reset when one class takes more "
                                          "of the window's predicted pixels."),
    refine: bool = typer.Option(False, "--refine/--no-refine", help="Also evaluate the source model with training-free "
                                "refinement of its least confident pixels (the pass \"refined\")."),
    refine_iters: int = RefineItersOption,
    refine_q: float = RefineQOption,
    refine_guide: str = RefineGuideOption,
    boundary_iou: bool = typer.Option(True, "--boundary-iou/--no-boundary-iou", help="Also compute Boundary IoU."),
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast inference and adaptation steps."),
    split: Optional[str] = ValSplitOption,
    max_images: Optional[int] = MaxImagesOption,
    batch_size: int = BatchSizeOption,
    num_workers: int = typer.Option(0, "--workers", min=0, help="DataLoader workers that corrupt images in parallel."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-image corruption randomness."),
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
    report: bool = ReportOption,
) -> None:
    """mIoU and ECE per condition of the model as it is and while it adapts at test time (TENT and variants).

    Example: trustseg adapt --checkpoint runs/segformer/best.pt --data camvid:data/camvid --method tent,reliable --refine --corruptions gaussian_noise,fog --severities 3 --out runs/adapt
    """
    from dataclasses import replace

    from trustseg.adapt.guard import GuardConfig
    from trustseg.adapt.predictor import AdaptConfig
    from trustseg.engine.distributed import is_main_process
    from trustseg.report.tables import rich_table
    from trustseg.robustness.corruptions import parse_corruptions, parse_severities
    from trustseg.workflows.adapt import AdaptRunConfig, condition_rows, run_adapt

    adaptations = tuple(AdaptConfig(
        method=name.strip(), mode=adapt_mode, optimizer=optimizer, lr=lr, steps=steps, predict=predict,
        reliable_fraction=reliable_fraction, weighting=weighting, anchor_weight=anchor_weight, bn_prior=bn_prior,
        guard=GuardConfig(window=guard_window, max_class_share=max_class_share) if guard else None,
    ) for name in method.split(","))
    inference = inference_config("whole", None, None, short_side, bf16, scale, refine, refine_iters, refine_q,
                                 refine_guide)
    config = AdaptRunConfig(
        checkpoint=str(checkpoint), data=data, out=str(out), adaptations=adaptations,
        refine=inference.refine, inference=replace(inference, refine=None), corruptions=parse_corruptions(corruptions),
        severities=parse_severities(severities), split=split, max_images=max_images, batch_size=batch_size,
        num_workers=num_workers, seed=seed, device=device, boundary_iou=boundary_iou, progress=progress,
        resume=resume, report=report,
    )
    result = run_adapt(config)
    if is_main_process():
        console.print(rich_table(*condition_rows(result.conditions), title=f"{adapt_mode} adaptation per condition (%)"))
        console.print(f"run directory: {result.run_dir}")


@app.command("corrupt")
def corrupt_command(
    data: str = DataOption,
    out: Path = typer.Option(..., "--out", help="Folder to write OUT/<corruption>/<severity>/... (or gallery.png)."),
    corruptions: str = CorruptionsOption,
    severities: str = SeveritiesOption,
    split: Optional[str] = ValSplitOption,
    max_images: Optional[int] = MaxImagesOption,
    seed: int = typer.Option(0, "--seed", help="Seed of the per-image corruption randomness."),
    gallery: bool = typer.Option(False, "--gallery", help="Write gallery.png (one image, corruption x severity) instead."),
    gallery_index: int = typer.Option(0, "--gallery-index", min=0, help="Which image the gallery shows."),
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
) -> None:
    """Write a corrupted copy of a dataset in its own layout (Cityscapes-C style), or a gallery PNG.

    Example: trustseg corrupt --data camvid:data/camvid --corruptions fog --severities 1-5 --out camvid-c
    """
    from trustseg.robustness.corruptions import parse_corruptions, parse_severities
    from trustseg.workflows.corrupt import CorruptConfig, run_corrupt

    result = run_corrupt(CorruptConfig(
        data=data, out=str(out), corruptions=parse_corruptions(corruptions), severities=parse_severities(severities),
        split=split, max_images=max_images, seed=seed, gallery=gallery, gallery_index=gallery_index, progress=progress,
        resume=resume,
    ))
    what = "gallery" if gallery else f"{len(result.written)} corrupted images"
    console.print(f"{what} written under {result.run_dir}")


@app.command("augment")
def augment_command(
    data: str = typer.Option(..., "--data", help="Training data to augment. " + DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for the synthetic dataset (folder: layout)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Trained model whose entropy picks the "
                                              "preserved classes (not with --selector no-model)."),
    backend: str = typer.Option("opencv", "--backend", help="opencv | texture | diffusers: what regenerates the rest."),
    tau: float = typer.Option(0.1, "--tau", help="Preserved fraction: whole classes are kept until they exceed tau*H*W."),
    selector: str = typer.Option("entropy-high", "--selector",
                                 help="entropy-high | entropy-low | random-class | random-region | no-model"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="Regenerate only the N highest-ranked images."),
    split: Optional[str] = typer.Option(None, "--split", help="Split (default: the spec's #split, else train)."),
    max_images: Optional[int] = MaxImagesOption,
    seed: int = typer.Option(0, "--seed", help="Image i uses seed + i (random selectors, donors, diffusion)."),
    opencv_method: str = typer.Option("telea", "--opencv-method", help="telea | ns (backend opencv)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Local diffusers inpainting pipeline folder (backend diffusers)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Diffusion prompt (default: the dataset's)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Diffusion negative prompt."),
    steps: int = typer.Option(40, "--steps", min=1, help="Diffusion steps."),
    guidance: float = typer.Option(7.0, "--guidance", help="Classifier-free guidance scale."),
    resolution: int = typer.Option(1024, "--resolution", help="Side of the square diffusion bucket (SDXL/FLUX 1024, "
                                   "SD 1.5 512); images go to the bucket of the nearest aspect ratio and back."),
    preview_rows: int = typer.Option(4, "--preview-rows", min=0, help="Images shown in preview.png (0: none)."),
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out (same settings)."),
) -> None:
    """Uncertainty-guided synthetic data: keep the hardest classes, regenerate the rest, label only what was kept.

    Example: trustseg augment --checkpoint runs/unet/best.pt --data camvid:data/camvid --backend texture --out camvid-synthetic
    """
    from trustseg.augment.backends import BackendConfig
    from trustseg.workflows.augment import AugmentConfig, run_augment

    result = run_augment(AugmentConfig(
        data=data, out=str(out), checkpoint=None if checkpoint is None else str(checkpoint), selector=selector, tau=tau,
        backend=BackendConfig(name=backend, opencv_method=opencv_method, model=None if model is None else str(model),
                              prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                              resolution=resolution),
        split=split, max_images=max_images, num_samples=num_samples, seed=seed, preview_rows=preview_rows,
        inference=inference_config(mode, crop, stride, short_side, False, 1.0), device=device, progress=progress,
        resume=resume,
    ))
    console.print(f"{len(result.written)} synthetic images written to {result.run_dir} (folder: layout; "
                  f"train on e.g. '{data}+folder:{result.run_dir}#ratio=1:1')")


@app.command("calibrate")
def calibrate_command(
    checkpoint: Path = CheckpointOption,
    fit_data: str = typer.Option(..., "--fit-data", help="Held-out labelled data the calibrators are fitted on. " + DATA_HELP),
    data: str = typer.Option(..., "--data", help="Data the calibrators are evaluated on (disjoint from --fit-data). " + DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    method: str = typer.Option("all", "--method", help="all, or comma-separated: ts, vs, vs_ti, ms, ms_ti, dirichlet, "
                               "ccaffine, ccaffine_argmax, lts, lts_ti, ibts, ibts_ti."),
    corruptions: str = typer.Option("", "--corruptions", help="Also evaluate under these corruptions (names, a family, common or all)."),
    severities: str = typer.Option("3", "--severities", help="Severities of --corruptions, e.g. 3 or 1-5."),
    fit_corruptions: str = typer.Option("", "--fit-corruptions", help="Fit under shift: each fit image clean or "
                                        "corrupted by one of these (names, a family, common or all), drawn per image; "
                                        "must differ from --corruptions unless --allow-overlap."),
    fit_severities: str = typer.Option("1-5", "--fit-severities", help="Severities of --fit-corruptions."),
    leave_one_family_out: bool = typer.Option(False, "--leave-one-family-out", help="For each family of --corruptions, "
                                              "fit on the --fit-corruptions of the other families and evaluate on it, "
                                              "against calibrators fitted on clean fit images."),
    fit_split: Optional[str] = typer.Option(None, "--fit-split", help="Split of --fit-data (default: the spec's #split, else val)."),
    split: Optional[str] = ValSplitOption,
    max_images: Optional[int] = MaxImagesOption,
    max_pixels: int = typer.Option(1_000_000, "--max-pixels", min=1,
                                   help="Labelled fit pixels sampled uniformly to fit pixel-wise methods."),
    max_crops: int = typer.Option(64, "--max-crops", min=1, help="Random fit crops kept to fit LTS/IBTS."),
    fit_crop: int = typer.Option(512, "--fit-crop", min=1, help="Side of those crops in pixels (smaller images are kept whole)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over the crops when fitting LTS/IBTS."),
    lr: float = typer.Option(1e-4, "--lr", min=1e-12, help="Adam learning rate when fitting LTS/IBTS (Ding et al.'s)."),
    bins: int = typer.Option(15, "--bins", min=1, help="Equal-width confidence bins of ECE/MCE."),
    save: str = typer.Option("best", "--save", help="Method written as calibrated checkpoint: best (lowest NLL on held-out "
                             "fit images among argmax-preserving methods), best-any (among all), a name, or none."),
    holdout: float = typer.Option(0.2, "--holdout", help="Share of the fit images held out to choose --save best/best-any."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Accept --fit-data and --data that share images, "
                                       "and --fit-corruptions that --corruptions also evaluates."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit subsample and of the corruptions."),
    device: str = DeviceOption,
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = Bf16Option,
    refine: bool = RefineOption,
    refine_iters: int = RefineItersOption,
    refine_q: float = RefineQOption,
    refine_guide: str = RefineGuideOption,
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
    report: bool = ReportOption,
) -> None:
    """Fit post-hoc calibrators, compare them on clean and corrupted data, write a calibrated checkpoint.

    Example: trustseg calibrate --checkpoint runs/unet/best.pt --fit-data camvid:data/camvid#split=val --data camvid:data/camvid#split=test --out runs/calibration
    """
    from trustseg.engine.distributed import is_main_process
    from trustseg.report.tables import rich_table
    from trustseg.robustness.corruptions import parse_corruptions, parse_severities
    from trustseg.workflows.calibration import COMPACT, CalibrateConfig, method_rows, parse_methods, run_calibrate

    config = CalibrateConfig(
        checkpoint=str(checkpoint), fit_data=fit_data, data=data, out=str(out), methods=parse_methods(method),
        fit_split=fit_split, split=split, corruptions=parse_corruptions(corruptions) if corruptions.strip() else (),
        severities=parse_severities(severities),
        fit_corruptions=parse_corruptions(fit_corruptions) if fit_corruptions.strip() else (),
        fit_severities=parse_severities(fit_severities), leave_one_family_out=leave_one_family_out,
        max_images=max_images, max_pixels=max_pixels, max_crops=max_crops,
        fit_crop=fit_crop, epochs=epochs, lr=lr, num_bins=bins, save=save, holdout=holdout, allow_overlap=allow_overlap, seed=seed,
        inference=inference_config(mode, crop, stride, short_side, bf16, scale, refine, refine_iters, refine_q,
                                   refine_guide),
        device=device, progress=progress, resume=resume, report=report,
    )
    result = run_calibrate(config)
    if is_main_process():
        for key, results in result.conditions.items():
            console.print(rich_table(*method_rows(result.methods, results, COMPACT, properties=False),
                                     title=f"calibration on {key} (%; all columns in report.md)"))
            best = result.best[key]
            console.print(f"best decision-preserving on {key}: {best['method']} (ECE {100 * best['ECE']:.2f}%)")
        for family, entry in (result.leave_one_family_out or {}).items():
            for key, best in entry["best_decision_preserving"].items():
                console.print(f"{family} held out, {key}: best decision-preserving {best['method']} (ECE "
                              f"{100 * best['ECE']:.2f}%; clean-fitted best {result.best[key]['method']} "
                              f"{100 * result.best[key]['ECE']:.2f}%)")
        if result.selection is not None:
            choice = result.selection
            console.print(f"--save {choice['rule']}: {choice['chosen']}, lowest {choice['score']} on "
                          f"{choice['holdout_images']} held-out fit image(s) among {choice['among']}")
        if result.saved is not None:
            console.print(f"calibrated checkpoint: {result.saved}")
        console.print(f"run directory: {result.run_dir}")


@app.command("compress")
def compress_command(
    checkpoint: Path = CheckpointOption,
    data: str = DataOption,
    out: Path = typer.Option(..., "--out", help="Run directory: compression.json, models/<method>.pt, frontier plots."),
    method: list[str] = typer.Option([], "--method", help="A compression spec, repeatable: tome:r=8 | "
                                     "algm:tau=0.9 | cts:k=100 | prune:flops=0.5[,importance=magnitude] | "
                                     "prune:flops=0.7+tome:r=4."),
    sweep: str = typer.Option("", "--sweep", help="Families run over a ladder of 4 levels each: tome, algm, cts, "
                              "prune, prune+tome (comma-separated)."),
    corruptions: Optional[str] = typer.Option(None, "--corruptions", help="Corruption set for the corrupted mIoU "
                                              "(names, a family, common or all; default: one per family)."),
    severities: str = typer.Option("3", "--severities", help="Severities of the corruption set: 3, 1-5 or 1,3,5."),
    split: Optional[str] = ValSplitOption,
    max_images: Optional[int] = MaxImagesOption,
    importance_images: int = typer.Option(16, "--importance-images", min=1,
                                          help="Training images for the Taylor importance of pruning."),
    finetune_steps: int = typer.Option(0, "--finetune-steps", min=0, help="Fine-tune each pruned model this many "
                                       "steps (its own recipe, lr x 0.1, distilled from the uncompressed model)."),
    policy_steps: int = typer.Option(500, "--policy-steps", min=1, help="Training steps of the CTS policy on the "
                                     "training split (when the checkpoint holds none)."),
    cost_size: Optional[str] = typer.Option(None, "--cost-size", help="'H,W' the cost images are resized to "
                                            "(default: what the model sees of each, padded to its stride)."),
    cost_images: int = typer.Option(8, "--cost-images", min=1, help="GFLOPs: mean over the first N images (ALGM's "
                                    "work depends on the content); latency: the first image."),
    latency_runs: int = typer.Option(10, "--latency-runs", min=1, help="Timed forwards per model."),
    seed: int = typer.Option(0, "--seed"),
    mode: str = ModeOption,
    crop: Optional[str] = CropOption,
    stride: Optional[str] = StrideOption,
    short_side: Optional[int] = ShortSideOption,
    scale: float = ScaleOption,
    bf16: bool = Bf16Option,
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
    report: bool = ReportOption,
) -> None:
    """Compress a ViT checkpoint (token merging, structural pruning, both) and measure cost and accuracy.

    Each method is timed side by side with the uncompressed model and evaluated clean and on a corruption
    set; --sweep draws the accuracy-cost frontier.

    Example: trustseg compress --checkpoint runs/vit/best.pt --data camvid:data/camvid --sweep tome,prune --out runs/compress
    """
    from trustseg.report.tables import rich_table
    from trustseg.robustness.corruptions import parse_corruptions, parse_severities
    from trustseg.workflows.compress import CompressConfig, cost_rows, run_compress

    chosen = {} if corruptions is None else {"corruptions": parse_corruptions(corruptions)}
    config = CompressConfig(
        checkpoint=str(checkpoint), data=data, out=str(out), methods=tuple(method),
        sweep=tuple(p.strip() for p in sweep.split(",") if p.strip()), **chosen,
        severities=parse_severities(severities), split=split, max_images=max_images,
        importance_batches=importance_images, finetune_steps=finetune_steps, policy_steps=policy_steps,
        cost_size=parse_pair(cost_size, "--cost-size"), cost_images=cost_images, latency_runs=latency_runs, seed=seed,
        inference=inference_config(mode, crop, stride, short_side, bf16, scale), device=device,
        progress=progress, resume=resume, report=report,
    )
    result = run_compress(config)
    console.print(rich_table(*cost_rows(result.baseline, result.methods), title="cost and accuracy"))
    console.print(f"run directory: {result.run_dir}")


@app.command("info")
def info_command(
    data: str = DataOption,
    out: Path = typer.Option(Path("runs/info"), "--out", help="Run directory to write."),
    split: Optional[str] = typer.Option(None, "--split", help="Split to count (default: the spec's, else train)."),
    progress: bool = ProgressOption,
) -> None:
    """Dataset split sizes and class pixel frequencies (table + PNG bar plot).

    Example: trustseg info --data camvid:data/camvid
    """
    from trustseg.report.tables import percent, rich_table
    from trustseg.workflows.info import InfoConfig, run_info

    result = run_info(InfoConfig(data=data, out=str(out), split=split, progress=progress))
    sizes = ", ".join(f"{split}: {size}" for split, size in result.split_sizes.items())
    rows = [
        [name, f"{count:,}", percent(freq)]
        for name, count, freq in zip(result.classes.names, result.pixel_counts, result.frequencies)
    ]
    console.print(rich_table(["class", "pixels", "% labelled"], rows, title=f"{data} ({result.split}); splits {sizes}"))
    console.print(f"ignored pixels: {result.ignored_pixels:,}; run directory: {result.run_dir}")


@app.command("report")
def report_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories written by trustseg commands."),
    out: Path = typer.Option(..., "--out", help="Folder for the reports: one page per run (in OUT/<run>/ when "
                             "several) and, for two or more runs, comparison.html and comparison.md."),
) -> None:
    """Self-contained HTML (and Markdown) report of each run, rebuilt from its files, and a comparison of
    several: side by side, ranking per metric, Kendall's tau between metrics, bootstrap intervals of mIoU.

    Example: trustseg report runs/unet-eval runs/segformer-eval runs/vit-eval --out runs/comparison
    """
    from trustseg.report.comparison import write_reports

    for page in write_reports(run_dirs, out):
        console.print(str(page))


@experiment_app.command("pos-embedding")
def pos_embedding_command(
    data: str = typer.Option(..., "--data", help="Training data spec (val: its val split). " + DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Run directory (one training run per variant and seed under runs/)."),
    budget_min: Optional[float] = typer.Option(None, "--budget-min", min=0.01, help="Training budget per run in minutes."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training budget per run in steps (instead)."),
    seeds: int = typer.Option(2, "--seeds", min=1, help="Seeds per variant (0, 1, ...)."),
    variants: str = typer.Option("ape,rope,none,asg", "--variants", help="Some of ape, rope, none, asg (none + Active Spatial Guidance)."),
    scales: str = typer.Option("0.5,0.75,1,1.25,1.5,2", "--scales", help="Test resolutions as factors of the training resolution."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training recipe of a vit_segmenter (default: built-in)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe key: key=value."),
    probe_images: int = typer.Option(16, "--probe-images", min=2, help="Val images the position probe reads."),
    device: str = DeviceOption,
    progress: bool = ProgressOption,
    resume: bool = ResumeOption,
) -> None:
    """APE vs RoPE vs no positional embedding vs Active Spatial Guidance: mIoU across test resolutions
    (mean ± std over seeds), a position probe of the tokens, table + plot + report.

    Example: trustseg experiment pos-embedding --config configs/camvid_pos_embedding.yaml --data camvid:data/camvid --seeds 2 --out runs/pos
    """
    from trustseg.report.tables import rich_table
    from trustseg.workflows.pos_embedding import PosEmbeddingConfig, resolution_rows, run_pos_embedding, verdict

    try:
        factors = tuple(float(v) for v in scales.split(","))
    except ValueError:
        raise UserError(f"--scales {scales!r}: expected comma-separated factors, e.g. 0.5,1,2") from None
    result = run_pos_embedding(PosEmbeddingConfig(
        data=data, out=str(out), budget_min=budget_min, steps=steps, seeds=seeds,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()), scales=factors,
        recipe=None if config is None else str(config), overrides=tuple(overrides), probe_images=probe_images,
        device=device, progress=progress, resume=resume,
    ))
    console.print(rich_table(*resolution_rows(result.summary, factors), title="mIoU (%) by test resolution"))
    console.print(verdict(result.summary))
    console.print(f"run directory: {result.run_dir}")


@bench_app.command("metrics")
def bench_metrics_command(
    num_images: int = typer.Option(200, "--num-images", min=1),
    height: int = typer.Option(512, "--height", min=1),
    width: int = typer.Option(1024, "--width", min=1),
    num_classes: int = typer.Option(19, "--num-classes", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Our ConfusionMatrix vs torchmetrics MulticlassJaccardIndex on the same stream.

    Example: trustseg bench metrics
    """
    from trustseg.bench.metrics import bench_metrics, format_metrics_bench

    result = bench_metrics(num_images=num_images, height=height, width=width, num_classes=num_classes, seed=seed)
    typer.echo(format_metrics_bench(result))


@bench_app.command("calibration")
def bench_calibration_command(
    num_images: int = typer.Option(8, "--num-images", min=1),
    size: str = typer.Option("512,1024", "--size", help="Image size 'H,W'."),
    num_classes: int = typer.Option(19, "--num-classes", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed passes over the stream (after 2 warm-up batches)."),
    model: str = typer.Option("segformer_b0", "--model", help="Model of the evaluation pass (a bench model name)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch intra-op threads (default: torch's)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Our CalibrationHistogram vs torchmetrics MulticlassCalibrationError, and its share of an eval pass.

    Example: trustseg bench calibration
    """
    from trustseg.bench.calibration import bench_calibration, format_calibration_bench

    height, width = parse_pair(size, "--size")
    result = bench_calibration(num_images=num_images, height=height, width=width, num_classes=num_classes,
                               repeats=repeats, seed=seed, model=model, threads=threads)
    typer.echo(format_calibration_bench(result))


@bench_app.command("model")
def bench_model_command(
    model: str = typer.Option("vit_s16", "--model", help="vit_ti16 | vit_s16 | vit_b16 | vit_s14 | vit_b14 | segformer_b0..b2 | unet"),
    size: str = typer.Option("512", "--size", help="Input size 'S' or 'H,W'."),
    batch_size: int = BatchSizeOption,
    runs: int = typer.Option(10, "--runs", min=1, help="Timed runs per dtype (after warm-up)."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Append a timm-schema CSV row here."),
    device: str = typer.Option("cpu", "--device", help="Where the model runs: " + DEVICE_HELP + "."),
) -> None:
    """Inference img/s, GFLOP/img and achieved GFLOP/s as a fraction of the matmul peak (same run).

    Example: trustseg bench model --model segformer_b0 --size 512,1024
    """
    from trustseg.bench.model import bench_model, format_model_bench

    result = bench_model(model, size=parse_pair(size, "--size"), batch_size=batch_size, runs=runs, csv_path=csv,
                         device=device)
    typer.echo(format_model_bench(result))


@bench_app.command("compress")
def bench_compress_command(
    backbone: str = typer.Option("vit_s16", "--backbone", help="vit_ti16 | vit_s16 | vit_b16 | vit_s14 | vit_b14"),
    method: list[str] = typer.Option([], "--method", help="Compression spec, repeatable (pruning by magnitude: "
                                     "prune:flops=0.5,importance=magnitude); default: half the tokens merged away, "
                                     "half the FLOPs pruned, and both moderately."),
    size: int = typer.Option(512, "--size", help="Square input side."),
    batch_size: int = BatchSizeOption,
    runs: int = typer.Option(10, "--runs", min=1, help="Timed rounds (after warm-up)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: torch's)."),
    output_json: Optional[Path] = typer.Option(None, "--json", help="Also write the full result here."),
    device: str = typer.Option("cpu", "--device", help="Where the models run: " + DEVICE_HELP + "."),
) -> None:
    """Token merging and structural pruning vs the uncompressed ViT: GFLOPs, latency, merging overhead (same run).

    Example: trustseg bench compress --backbone vit_s16 --size 512 --runs 10
    """
    import json

    from trustseg.bench.compress import bench_compression, format_compression_bench
    from trustseg.report.tables import rich_table

    result = bench_compression(backbone, methods=method or None, size=size, batch_size=batch_size, runs=runs,
                               threads=threads, device=device)
    machine = result["machine"]
    console.print(rich_table(*format_compression_bench(result), title=f"{backbone} at {size}x{size}, batch {batch_size}, "
                             f"{machine['device']}, {machine['threads']} threads, load {machine['load_average_before'][0]:.1f}"))
    if output_json is not None:
        output_json.write_text(json.dumps(result, indent=1))


@bench_app.command("corruptions")
def bench_corruptions_command(
    data: str = typer.Option("synthetic#split=val", "--data", help="Images to corrupt (resized). " + DATA_HELP),
    num_images: int = typer.Option(16, "--num-images", min=1),
    size: str = typer.Option("512,1024", "--size", help="Image size 'H,W'."),
    severity: int = typer.Option(3, "--severity", min=1, max=5),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Timed rounds (after one warm-up round)."),
    corruptions: str = CorruptionsOption,
    device: str = typer.Option("cpu", "--device", help="Where ours run (the reference runs on the CPU): " + DEVICE_HELP + "."),
) -> None:
    """Our batched corruptions vs the reference imagecorruptions package, per image, same images.

    Example: trustseg bench corruptions --data camvid:data/camvid --num-images 16
    """
    from trustseg.bench.corruptions import bench_corruptions, format_corruptions_bench
    from trustseg.robustness.corruptions import parse_corruptions

    height, width = parse_pair(size, "--size")
    result = bench_corruptions(data=data, num_images=num_images, height=height, width=width, severity=severity,
                               rounds=rounds, corruptions=parse_corruptions(corruptions), device=device)
    typer.echo(format_corruptions_bench(result))


@bench_app.command("export")
def bench_export_command(
    model: str = typer.Option("vit_s16", "--model", help="vit_ti16 | vit_s16 | vit_b16 | vit_s14 | vit_b14 | segformer_b0..b2 | unet"),
    size: str = typer.Option("512", "--size", help="Input size 'S' or 'H,W'."),
    batch_size: int = BatchSizeOption,
    runs: int = typer.Option(10, "--runs", min=1, help="Timed rounds (after 2 warm-up rounds)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads of both (default: torch's)."),
) -> None:
    """onnxruntime vs eager torch latency of the same exported predictor on the CPU, interleaved.

    Example: trustseg bench export --model vit_s16 --size 512
    """
    from trustseg.bench.export import bench_export, format_export_bench

    result = bench_export(model, size=parse_pair(size, "--size"), batch_size=batch_size, runs=runs, threads=threads)
    typer.echo(format_export_bench(result))


# the system refused a write: disk full, quota exceeded, read-only file system
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def main() -> None:
    try:
        app()
    except UserError as error:
        stop(str(error))
    except OSError as error:
        if error.errno not in FULL_OR_READ_ONLY:
            raise
        stop(f"cannot write {error.filename or 'an output file'}: {error.strerror}")


def stop(message: str) -> None:
    """End a failed command: one line on stderr, exit status 2. A message quotes paths and specs: "[x]" in
    them is text, not console markup, and a file name may hold a line break, written as \\n so that the
    error stays one line."""
    message = escape(message.replace("\r", "\\r").replace("\n", "\\n"))
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    from trustseg.engine.distributed import leave

    leave(wait=False)  # its peers under torchrun may never reach the exit meeting
    sys.exit(2)


if __name__ == "__main__":
    main()
