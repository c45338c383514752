"""Fuzzing training recipes: YAML files and ``--set key=value`` overrides, read by `load_train_config`.

Inputs: YAML documents over the recipe's own keys with values of the right type, of a wrong type and
nested at random, plus unknown keys; deeply nested documents; the packaged demo recipe truncated,
bit-flipped or replaced by random bytes; overrides with real and made-up dotted keys and any value.
Property: a `TrainConfig` whose every field holds a value of its declared type and whose model builds
(on the meta device) or is refused in one line, or a one-line UserError that names the file, the
``--set`` item or the config key.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from importlib.resources import files
from typing import Any, Literal

import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings, mutated, outcome
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.training.config import TrainConfig, load_train_config

DEMO_RECIPE = files("trustseg.recipes").joinpath("demo_synthetic.yaml").read_bytes()
_names = itertools.count()


def fields_of(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def dotted_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every key of the recipe, sections included: ``steps``, ``optim``, ``optim.lr``, ..."""
    keys = []
    for name, annotation in fields_of(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(annotation):
            keys += dotted_keys(annotation, prefix + name + ".")
    return keys


# --- values --------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["null", "none", "yes", "off", "1e-3", "5e2", "[1, 2]", "cosine", "sqrt_inverse", "synthetic",
                     "auto", "cpu", "unet", "1,2", "nan", "-inf", "0x10", "1_000"]),
)
any_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def typed(annotation: Any) -> st.SearchStrategy:
    """Values of `annotation`'s type (in range or not): what a recipe with the right types holds."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else typed(a) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(typed(args[0]), max_size=4)
        return st.tuples(*(typed(a) for a in args)).map(list)
    if origin is dict:  # model.options (any builder's option names) or optim.lr_mult
        return st.dictionaries(st.sampled_from(["base_width", "depth", "norm", "variant", "backbone", "head", "pos",
                                                "decoder", "x"]),
                               st.one_of(st.integers(-2, 8), st.sampled_from(["b0", "group", "vit_ti16", "ape", "x"]),
                                         st.none(), st.floats(0, 4), st.booleans()), max_size=2)
    if dataclasses.is_dataclass(annotation):
        return sections(annotation)
    return {
        bool: st.booleans(),
        int: st.one_of(st.integers(1, 64), st.integers(-3, 600)),
        float: st.one_of(st.floats(0.01, 1.0), st.floats(-2.0, 1000.0)),
        str: st.sampled_from(["synthetic", "synthetic#split=val", "unet", "segformer", "vit_segmenter", "auto", "cpu",
                              "runs/x", "", "none"]),
    }[annotation]


@st.composite
def sections(draw: st.DrawFn, cls: type = TrainConfig) -> dict[str, Any]:
    """A mapping of some of `cls`'s keys (typed values mostly, any value sometimes) and maybe an unknown key."""
    hints = fields_of(cls)
    chosen = draw(st.lists(st.sampled_from(sorted(hints)), max_size=4, unique=True))
    values = {key: draw(typed(hints[key]) if draw(st.integers(0, 7)) else any_values) for key in chosen}
    if not draw(st.integers(0, 5)):
        values[draw(st.sampled_from(["stepz", "lr", "Data", "model.name", "1"]))] = draw(scalars)
    return values


def budgeted(values: dict[str, Any]) -> dict[str, Any]:
    """Most recipes set a budget; without one the recipe is refused before any other check."""
    return {"steps": 10, **values}


def nested(depth: int, flow: bool) -> str:
    """A YAML document nested `depth` levels deep, in flow (``[[[...]]]``) or block style."""
    if flow:
        return "model:\n  options: {a: " + "[" * depth + "]" * depth + "}\n"
    return "model:\n  options:\n" + "".join("    " + "  " * i + f"k{i}:\n" for i in range(depth))


overrides = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(dotted_keys()), st.sampled_from(["model.options.depth", "optim.lr_mult.decoder",
                                                                   "", ".", "a..b", "steps.x", "data.crop.0"])),
        st.sampled_from(["=", "=", "", " = "]),
        st.one_of(st.text(max_size=10), scalars.map(str), st.integers(1, 1200).map(lambda n: "[" * n)),
    ).map("".join),
    max_size=2,
)


# --- the property ----------------------------------------------------------------------------------

def conforms(value: Any, annotation: Any) -> bool:
    """Whether a built config's `value` has the declared type `annotation`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(conforms(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, annotation) and all(
            conforms(getattr(value, name), hint) for name, hint in fields_of(annotation).items())
    if annotation is float:
        return isinstance(value, float) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check(result, path) -> None:
    """A refusal names the file, the config key or the --set item; a config has the declared types, and
    its model builds (on the meta device: shapes only) or is refused in one line naming the model."""
    if isinstance(result, UserError):
        message = str(result)
        assert any(needle in message for needle in (str(path), "config", "--set")), message
        return
    assert conforms(result, TrainConfig), result
    model = result.model

    def build():
        with torch.device("meta"):
            return build_model(model.name, num_classes=3, **model.options)

    outcome("build_model", build, "model")


def load(tmp_path, data: bytes, items: list[str]):
    path = tmp_path / f"recipe{next(_names)}.yaml"
    path.write_bytes(data)
    result = outcome("load_train_config", lambda: load_train_config(path, items))
    check(result, path)


@fuzz_settings(max_examples=300)
@given(values=sections(), items=overrides, budget=st.booleans())
def test_recipes_with_any_keys_and_values(tmp_path, values, items, budget):
    load(tmp_path, yaml.safe_dump(budgeted(values) if budget else values).encode(), items)


@fuzz_settings(max_examples=300)
@given(data=st.data())
def test_mutated_recipe_files(tmp_path, data):
    load(tmp_path, data.draw(mutated(DEMO_RECIPE, head=len(DEMO_RECIPE))), [])


@fuzz_settings(max_examples=20)
@given(depth=st.one_of(st.sampled_from([2, 50, 200, 400, 1000]), st.integers(1, 1000)), flow=st.booleans())
def test_deeply_nested_recipes(tmp_path, depth, flow):
    load(tmp_path, ("steps: 10\n" + nested(depth, flow)).encode(), [])
