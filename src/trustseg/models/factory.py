"""Build a model from its recipe: a builder name and simple keyword options (stored in checkpoints)."""

from __future__ import annotations

import inspect
import types
import typing
from importlib import import_module
from typing import Any, Callable

import torch
from torch import nn

from trustseg.errors import UserError

# name -> (module, builder); imported on use so that building a U-Net never imports the ViT code.
BUILDERS: dict[str, tuple[str, str]] = {
    "unet": ("trustseg.models.unet", "unet"),
    "segformer": ("trustseg.models.segformer", "segformer"),
    "vit_segmenter": ("trustseg.models.segmenter", "vit_segmenter"),
}


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in BUILDERS:
        raise UserError(f"unknown model {name!r}; expected one of {', '.join(BUILDERS)}")
    module, builder_name = BUILDERS[name]
    return getattr(import_module(module), builder_name)


def model_options(name: str) -> list[str]:
    """The keyword options model `name` accepts besides num_classes, in the builder's order."""
    return [option for option in inspect.signature(_builder(name)).parameters if option != "num_classes"]


def build_model(name: str, *, num_classes: int, **options: Any) -> nn.Module:
    """Model whose forward maps normalised images (B, 3, H, W) to logits (B, K, H, W).

    Options come from recipes and checkpoints, so each is checked against the builder's annotation
    (int, float, str, bool, a Literal of names, or None where allowed) before the builder sees it.
    """
    accepted = set(model_options(name))
    builder = _builder(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise UserError(f"model {name!r}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    hints = typing.get_type_hints(builder)
    for key, value in options.items():
        if key in hints and not _accepts(value, hints[key]):
            raise UserError(f"model {name!r}: option {key}={value!r}; expected {_describe(hints[key])}")
    return builder(num_classes=num_classes, **options)


def _accepts(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):  # list[int], tuple[int, ...]: every element of the element type
        return isinstance(value, (list, tuple)) and all(_accepts(v, args[0]) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True  # another type: left to the builder


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list, each {_describe(args[0])}"
    return {type(None): "null", bool: "true or false", int: "an int", float: "a number", str: "a string"}.get(
        annotation, str(annotation))


def class_dependent_keys(name: str, **options: Any) -> set[str]:
    """State-dict keys of model `name` whose shape depends on num_classes: its classifier.

    Found by building the model twice on the meta device (no memory, no initialisation cost) with two
    class counts and comparing shapes, so every architecture answers without a hand-kept list.
    """
    with torch.device("meta"):
        one, two = (build_model(name, num_classes=k, **options).state_dict() for k in (2, 3))
    return {key for key, tensor in one.items() if tensor.shape != two[key].shape}
