"""The training recipe: frozen dataclasses that a YAML file maps onto 1:1, plus ``key=value`` overrides.

Run controls (seed, batch size, budget, validation cadence) sit at the top level; each component has
its own section: ``data``, ``model``, ``optim``, ``schedule``, ``loss``. Every value is checked when the
dataclass is built, so a bad YAML file and a bad ``--set`` fail the same way: one ``UserError`` that
names the dotted key, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trustseg.engine.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from trustseg.errors import UserError

CLASS_WEIGHTINGS = ("none", "median_frequency", "sqrt_inverse")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise UserError(f"config {key}={value!r}: expected {expected}")


@dataclass(frozen=True)
class DataConfig:
    """Datasets as data specs (see ``trustseg.data.spec``) and the training augmentation.

    Training crops: rescale to ``base_size`` x a ratio from ``scale`` (skipped when ``base_size`` is
    None), random ``crop`` (redrawn while one class covers ``cat_max_ratio`` of it), horizontal flip,
    optional colour jitter, then normalisation with ``mean``/``std`` (stored in the checkpoint).
    Validation predicts whole images (padded to the model's stride) or, with ``val_crop`` and
    ``val_stride``, slides windows over them as ``trustseg eval --mode slide`` does.
    """

    train: str = "synthetic"
    val: str | None = None  # None: the train spec with split=val
    crop: tuple[int, int] = (128, 128)
    base_size: tuple[int, int] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    cat_max_ratio: float = 0.75
    color_jitter: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 0
    val_batch_size: int = 4
    # sliding-window validation (windows of val_crop every val_stride), for images larger than the crop
    val_crop: tuple[int, int] | None = None
    val_stride: tuple[int, int] | None = None
    # multi-resolution training: each step crops at `crop` x one of these factors (drawn per step),
    # with the batch resized to about batch_size x crop pixels
    crop_scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        _check(all(c > 0 for c in self.crop), "data.crop", self.crop, "two positive ints (height, width)")
        _check(len(self.crop_scales) > 0 and min(self.crop_scales) > 0, "data.crop_scales", self.crop_scales,
               "factors > 0, e.g. [0.75, 1.0, 1.25]")
        _check(0 < self.scale[0] <= self.scale[1], "data.scale", self.scale, "0 < low <= high")
        _check(
            self.base_size is not None or self.scale == (1.0, 1.0),
            "data.scale",
            self.scale,
            "(1.0, 1.0) unless data.base_size is set (the size the scale ratios multiply)",
        )
        _check(self.base_size is None or min(self.base_size) > 0, "data.base_size", self.base_size, "positive ints")
        _check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", self.cat_max_ratio, "a fraction in (0, 1]")
        _check(0 <= self.color_jitter < 1, "data.color_jitter", self.color_jitter, "a fraction in [0, 1)")
        _check(min(self.std) > 0, "data.std", self.std, "three positive values (0..1 units)")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an int >= 0")
        _check(self.val_batch_size >= 1, "data.val_batch_size", self.val_batch_size, "an int >= 1")
        for key in ("val_crop", "val_stride"):
            value = getattr(self, key)
            _check(value is None or min(value) > 0, f"data.{key}", value, "two positive ints (height, width) or null")
        _check((self.val_crop is None) == (self.val_stride is None), "data.val_stride", self.val_stride,
               "set together with data.val_crop (e.g. val_crop=[512,1024], val_stride=[341,683])")


@dataclass(frozen=True)
class ModelConfig:
    """``models.factory.build_model(name, num_classes=..., **options)`` and where a fresh run starts.

    ``weights``: pretrained weights in a published layout (``models.pretrained``): a transformers
    SegFormer for ``segformer``, a DINOv2/DINOv3/timm ViT backbone for ``vit_segmenter``; as a
    ``save_pretrained`` folder or one file. ``{option}`` in the path is replaced by that model
    option, so ``weights/mit-{variant}`` follows ``options.variant``.
    ``init_from``: a checkpoint written by ``trustseg train`` for the same model; a different class
    count re-initialises only the classifier. Both are read only by a fresh run, never on --resume.
    """

    name: str = "unet"
    options: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.weights is None or self.init_from is None, "model.init_from", self.init_from,
               "null when model.weights is set (a run starts from one of the two)")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW. ``layer_decay`` < 1 scales block ``i`` of a ViT backbone by ``layer_decay**(depth - i)``.

    ``lr_mult`` multiplies the lr of the parameters under a module path, e.g. ``{decoder: 10.0}``: a
    freshly initialised SegFormer head learning 10x faster than its pretrained encoder (Xie et al. 2021).
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 1.0
    lr_mult: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "a learning rate > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a value >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas, "two values in [0, 1)")
        _check(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "a factor in (0, 1]")
        for prefix, mult in self.lr_mult.items():
            _check(isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult > 0,
                   f"optim.lr_mult.{prefix}", mult, "a factor > 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "a norm > 0 or null")


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from ``warmup_start_factor * lr`` over ``warmup_steps``, then ``kind`` decay to
    ``end_factor * lr`` at the end of the budget (last step, or when the time budget runs out)."""

    kind: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    end_factor: float = 0.0
    power: float = 0.9  # exponent of the poly schedule

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an int >= 0")
        _check(0 <= self.warmup_start_factor <= 1, "schedule.warmup_start_factor", self.warmup_start_factor, "[0, 1]")
        _check(0 <= self.end_factor <= 1, "schedule.end_factor", self.end_factor, "a fraction of lr in [0, 1]")
        _check(self.power > 0, "schedule.power", self.power, "an exponent > 0")


@dataclass(frozen=True)
class LossConfig:
    """Cross-entropy (ignore_index from the dataset) with optional class weights and OHEM.

    ``class_weights``: "none", "median_frequency" (Eigen & Fergus 2015), "sqrt_inverse" (both computed
    from the train masks) or an explicit list with one weight per class. OHEM keeps the pixels whose
    loss exceeds ``ohem_threshold`` and at least the ``ohem_min_kept`` fraction of the hardest pixels;
    either may be used alone.
    """

    class_weights: str | tuple[float, ...] = "none"
    ohem_threshold: float | None = None
    ohem_min_kept: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, str):
            _check(self.class_weights in CLASS_WEIGHTINGS, "loss.class_weights", self.class_weights,
                   f"one of {', '.join(CLASS_WEIGHTINGS)} or a list of per-class weights")
        else:
            _check(all(w >= 0 for w in self.class_weights) and any(w > 0 for w in self.class_weights),
                   "loss.class_weights", self.class_weights, "non-negative weights, at least one > 0")
        _check(self.ohem_threshold is None or self.ohem_threshold >= 0, "loss.ohem_threshold",
               self.ohem_threshold, "a loss value >= 0 (e.g. 0.357 = -log 0.7) or null")
        _check(self.ohem_min_kept is None or 0 < self.ohem_min_kept <= 1, "loss.ohem_min_kept",
               self.ohem_min_kept, "a fraction of the labelled pixels in (0, 1] or null")

    @property
    def ohem(self) -> bool:
        return self.ohem_threshold is not None or self.ohem_min_kept is not None


@dataclass(frozen=True)
class ASGConfig:
    """Active Spatial Guidance (Liu et al. 2026): a ViT without any positional mechanism learns where its
    tokens lie from an auxiliary loss that regresses each final patch token's (row, col); the loss
    weight warms up linearly from ``lambda_min`` to ``lambda_max`` over the first ``warmup_steps``
    optimiser steps (paper: 10 -> 30 over 60 steps for segmentation). Training only: the head that
    regresses the positions is not part of the checkpoint."""

    enabled: bool = False
    lambda_max: float = 30.0
    lambda_min: float = 10.0
    warmup_steps: int = 60
    loss: Literal["smooth_l1", "l1", "mse"] = "smooth_l1"

    def __post_init__(self) -> None:
        _check(0 <= self.lambda_min <= self.lambda_max, "asg.lambda_min", self.lambda_min,
               "a weight in [0, asg.lambda_max]")
        _check(self.warmup_steps >= 0, "asg.warmup_steps", self.warmup_steps, "an int >= 0")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from a frozen teacher checkpoint (``training/distill.py``): the loss gains
    ``weight * T**2 * KL(teacher || student)`` of the per-pixel softmax at temperature T. ``teacher``
    None = off. Typical use: fine-tuning a pruned model with the unpruned one as teacher."""

    teacher: str | None = None
    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "distill.weight", self.weight, "a weight >= 0")
        _check(self.temperature > 0, "distill.temperature", self.temperature, "a temperature > 0")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. The budget is ``steps`` or ``epochs`` and/or ``time_budget_min``: the run stops
    at whichever ends first. ``batch_size`` is global: under torchrun each process takes its share."""

    out: str = "runs/train"
    seed: int = 0
    batch_size: int = 8
    steps: int | None = None
    epochs: int | None = None
    time_budget_min: float | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    bf16: bool = False  # autocast forward passes (training and validation) to bfloat16
    fp16: bool = False  # autocast training forward passes to float16 with a gradient scaler (CUDA only)
    compile: bool = False  # torch.compile the training forward pass (pays off on GPUs, rarely on CPUs)
    channels_last: bool = False  # NHWC memory layout: oneDNN's fast path for convolutions on CPU
    val_every: int = 0  # steps between validations; 0 = only at the end
    checkpoint_every: int = 0  # steps between last.pt saves besides validations; 0 = only at validations
    log_every: int = 10  # steps per history.jsonl line
    report: bool = True  # write report.md / report.html at the end
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    asg: ASGConfig = ASGConfig()
    distill: DistillConfig = DistillConfig()

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "an int >= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        _check(self.steps is None or self.steps >= 1, "steps", self.steps, "an int >= 1 or null")
        _check(self.epochs is None or self.epochs >= 1, "epochs", self.epochs, "an int >= 1 or null")
        _check(self.steps is None or self.epochs is None, "epochs", self.epochs,
               "null when steps is set (one of the two)")
        _check(self.time_budget_min is None or self.time_budget_min > 0, "time_budget_min",
               self.time_budget_min, "minutes > 0 or null")
        if self.steps is None and self.epochs is None and self.time_budget_min is None:
            raise UserError("config: no training budget; set steps, epochs or time_budget_min")
        for key in ("val_every", "checkpoint_every"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "steps >= 0 (0 = only at the end)")
        _check(self.log_every >= 1, "log_every", self.log_every, "an int >= 1")
        _check(not (self.bf16 and self.fp16), "fp16", self.fp16, "false when bf16 is true (one autocast dtype)")


# ---------------------------------------------------------------------------------------------------
# Building configs from plain data (YAML) and key=value strings, with type coercion.

_TRUE = {"true", "yes", "on", "1"}
_NOUNS = {int: "int", float: "number", str: "string", bool: "bool"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        noun = _NOUNS.get(args[0], str(args[0]))
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {noun}s"
        return f"a list of {len(args)} {noun}s"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(annotation))
    return {int: "an int", float: "a number", bool: "true or false", str: "a string"}.get(annotation, str(annotation))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML or an override string) as ``annotation``; UserError naming ``key`` if impossible."""
    try:
        return _convert(value, annotation, key)
    except (TypeError, ValueError):
        raise UserError(f"config {key}={value!r}: expected {_type_name(annotation)}") from None


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and type(None) in options):
            if type(None) in options:
                return None
            raise ValueError
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except (TypeError, ValueError, UserError):
                continue
        raise ValueError
    if origin is Literal:
        if value in typing.get_args(annotation):
            return value
        raise ValueError
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part for part in value.strip("[]() ").split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ValueError
        return tuple(_convert(v, a, key) for v, a in zip(value, args, strict=False))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError
        return build_dataclass(annotation, value, prefix=key + ".")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, str):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    raise TypeError(f"no conversion to {annotation}")


def build_dataclass(cls: type, values: dict[str, Any], *, prefix: str = "") -> Any:
    """``cls(**values)`` with every value coerced to its field's type; unknown keys are a UserError."""
    if not isinstance(values, dict):
        raise UserError(f"config {prefix.rstrip('.') or 'file'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        section = f" in {prefix.rstrip('.')}" if prefix else ""
        shown = repr(f"{prefix}{unknown[0]}")[1:-1]  # a key holding a line break stays on one line
        raise UserError(f"unknown config key {shown}; accepted keys{section}: {', '.join(names)}")
    return cls(**{name: _coerce(value, hints[name], prefix + name) for name, value in values.items()})


def _parse_value(text: str) -> Any:
    """YAML scalar/list syntax for override values ("3", "true", "[240, 320]", "null"); else the raw string."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, RecursionError):  # PyYAML recurses once per nesting level: "[[[..." ends here too
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs in a nested dict (a copy); sections are created as needed."""
    result = _deep_copy(values)
    for item in overrides:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
        *sections, last = key.split(".")
        target = result
        for depth, section in enumerate(sections):
            node = target.setdefault(section, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {'.'.join(sections[: depth + 1])} is not a section")
            target = node
        target[last] = _parse_value(text)
    return result


def _deep_copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    return build_dataclass(TrainConfig, apply_overrides(values or {}, list(overrides or [])))


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (None: all defaults), apply ``key=value`` overrides, check every value."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as error:
            raise UserError(f"config file {path}: not UTF-8 text (byte {error.start}); expected a YAML recipe"
                            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise UserError(f"config file {path}: not valid YAML{where}") from None
        except RecursionError:  # PyYAML recurses once per nesting level
            raise UserError(f"config file {path}: nested too deeply to parse; a recipe nests a few levels "
                            f"(e.g. model.options.depth)") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path}: expected a mapping of keys at the top level")
    return config_from_dict(values, overrides)
