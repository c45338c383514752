"""Fuzzing data-spec strings: ``NAME[:PATH][#key=value,...]``, combined ``SPEC+SPEC[#ratio=...]``.

Inputs: specs built from the grammar's pieces (dataset names, real and missing folders, paths holding
``+``, ``#`` or brackets, every option with well- and ill-typed values, ``images=`` slices, ``ratio=``
weights) and free text over the grammar's alphabet or any characters.
Property: `parse_spec`, `describe_spec`, `resolve_split` and `load_dataset` return a result or raise a
one-line UserError that names a piece of the spec; a loaded dataset is non-empty and its first and
last samples hold a uint8 image and a mask of class ids or the ignore label.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from data_trees import label_grid, write_image, write_mask
from fuzzing import fuzz_settings, outcome
from trustseg.data.spec import DATASET_NAMES, describe_spec, load_dataset, parse_spec, resolve_split
from trustseg.errors import UserError


def folder_dataset(root, num_classes: int | None, splits: tuple[str, ...] = ()) -> str:
    """A folder dataset of two 6x8 samples (labels 0..2 and 255); split folders when `splits` is given."""
    for split in splits or ("",):
        for i in range(2):
            write_image(root / "images" / split / f"s{i}.png", seed=i, size=(6, 8))
            write_mask(root / "masks" / split / f"s{i}.png", label_grid([0, 1, 2, 255], (6, 8)))
    if num_classes is not None:
        (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(num_classes)))
    return str(root)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, list[str]]:
    """Folders and files a spec may name, by the dataset name they suit: folder datasets (odd names
    too), a CamVid tree; a file and a missing path suit none."""
    base = tmp_path_factory.mktemp("specs")
    camvid = base / "camvid"
    for split in ("train", "val"):
        write_image(camvid / split / "a.png", seed=0, size=(6, 8))
        write_mask(camvid / f"{split}annot" / "a.png", label_grid(list(range(12)), (6, 8)))
    return {
        "folder": [
            folder_dataset(base / "flat", 3),
            folder_dataset(base / "split", 3, ("train", "val")),
            folder_dataset(base / "inferred", None),
            folder_dataset(base / "four", 4),
            folder_dataset(base / "a+b [x]", 3),
            folder_dataset(base / "hash#name", 3),
        ],
        "camvid": [str(camvid)],
        "none": [str(base / "flat" / "classes.txt"), str(base / "missing")],
    }


OPTION_KEYS = ["split", "images", "num_classes", "cache", "reduce_zero_label", "ratio", "num_images", "size",
               "seed", "min_objects", "max_objects", "rare_prob", "noise_std", "label_type", "mask_dir", "color",
               "1x", ""]
VALUES = st.one_of(
    st.sampled_from(["train", "val", "test", "", "true", "false", "yes", "0", "1", "3", "-1", "255", "65535", "1e309",
                     "nan", "inf", "0.5", "0:1", "1:", ":1", "::2", "1::2", "::0", "5:9", "a:b", "1:2:3:4", "1:1",
                     "3:0", "1:-1", "-1:", "16x24", "x", "labelTrainIds", "../..", "SegmentationClass", " 2 "]),
    st.integers(-3, 70).map(str),
    st.text(alphabet="0123456789:-.aex ", max_size=6),
)


# values each dataset's options take in a working spec, so that fuzzed specs also load
COMMON = {"split": ["train", "val"], "images": ["0:1", "1:", "::2", "-1:"], "cache": ["true", "false"]}
PLAUSIBLE = {
    "folder": {**COMMON, "num_classes": ["3"], "reduce_zero_label": ["false"]},
    "camvid": COMMON,
    "synthetic": {**COMMON, "num_images": ["2", "3"], "size": ["32", "32x40"], "seed": ["1"], "noise_std": ["0"]},
}


@st.composite
def options(draw: st.DrawFn, name: str) -> str:
    """``#key=value,...``: nothing, pairs that dataset `name` takes, or any key with any value (or no ``=``)."""
    kind = draw(st.sampled_from(["none", "none", "plausible", "plausible", "any"]))
    if kind == "none":
        return ""
    plausible = PLAUSIBLE.get(name.strip().lower(), COMMON)
    if kind == "plausible":
        keys = draw(st.lists(st.sampled_from(sorted(plausible)), min_size=1, max_size=2, unique=True))
        return "#" + ",".join(f"{key}={draw(st.sampled_from(plausible[key]))}" for key in keys)
    items = draw(st.lists(st.tuples(st.sampled_from(OPTION_KEYS), VALUES), max_size=3))
    separator = draw(st.sampled_from([",", ", ", ",,"]))
    return "#" + separator.join(f"{key}={value}" if draw(st.integers(0, 9)) else key for key, value in items)


@st.composite
def parts(draw: st.DrawFn, paths: dict[str, list[str]]) -> str:
    """One part: a name (or a wrong one), usually ``:PATH`` to a folder it suits (synthetic: usually no
    path), then options."""
    name = draw(st.sampled_from(["folder", "folder", "synthetic", *DATASET_NAMES, "Folder", " camvid ", "kitti", ""]))
    suits = paths.get(name.strip().lower(), [])
    path = draw(st.sampled_from(suits if suits and draw(st.integers(0, 2)) else sum(paths.values(), [])))
    usual, odd = ("", f":{path}") if name.strip().lower() == "synthetic" else (f":{path}", path)
    where = draw(st.sampled_from([usual] * 6 + [odd, ":"]))
    return f"{name}{where}{draw(options(name))}"


@st.composite
def grammar_specs(draw: st.DrawFn, paths: dict[str, list[str]]) -> str:
    pieces = draw(st.lists(parts(paths), min_size=1, max_size=3))
    joiner = draw(st.sampled_from(["+", " + ", "+"]))
    spec = joiner.join(pieces)
    if len(pieces) > 1 and draw(st.booleans()):
        weights = draw(st.lists(st.sampled_from(["1", "2", "0", "-1", "0.5", "inf", "x", ""]), min_size=1, max_size=4))
        spec += ("," if "#" in pieces[-1] else "#") + "ratio=" + ":".join(weights)
    return spec


def specs(paths: dict[str, list[str]]):
    return st.one_of(
        grammar_specs(paths),
        st.text(alphabet="folder:synthetic#+=,/ 0123456789[]", max_size=30),
        st.text(max_size=20),
    )


def tokens(spec: str) -> list[str]:
    """The pieces of a spec that a message may name: names, paths, option keys and values."""
    return [t for t in re.split(r"[:#+,=\s]+", spec) if t]


def check_names_spec(result, spec: str, *arguments: str) -> None:
    """A refusal names the spec, a piece of it, or one of the other `arguments` of the call."""
    if isinstance(result, UserError):
        message = str(result)
        named = ["data spec", *tokens(spec), *arguments]
        assert any(t in message for t in named), (spec, message)


def check_dataset(dataset, spec: str) -> None:
    classes = dataset.classes
    assert len(dataset) >= 1, spec
    for index in {0, len(dataset) - 1}:
        sample = dataset[index]
        image, mask = sample["image"], sample["mask"]
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3, spec
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:], spec
        valid = (mask >= 0) & (mask < classes.num_classes) | (mask == classes.ignore_index)
        assert bool(valid.all()), (spec, np.unique(mask.numpy()))


@fuzz_settings(max_examples=400)
@given(data=st.data())
def test_specs_parse_or_refuse(paths, data):
    spec = data.draw(specs(paths))
    check_names_spec(outcome("describe_spec", lambda: describe_spec(spec)), spec)
    check_names_spec(outcome("resolve_split", lambda: resolve_split(spec, None, "val")), spec)
    parsed = outcome("parse_spec", lambda: parse_spec(spec))
    check_names_spec(parsed, spec)
    if not isinstance(parsed, UserError):
        assert parsed.name in DATASET_NAMES and (parsed.path is None) == (parsed.name == "synthetic"), spec


@fuzz_settings(max_examples=300)
@given(data=st.data(), split=st.sampled_from([None, None, "val", ""]))
def test_specs_load_or_refuse(paths, data, split):
    spec = data.draw(specs(paths))

    def load():
        dataset = load_dataset(spec, split=split)
        check_dataset(dataset, spec)
        return dataset

    check_names_spec(outcome("load_dataset", load), spec, *(["split"] if split is not None else []))
