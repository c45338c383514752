"""Data spec strings: ``NAME``, ``NAME:PATH``, optionally followed by ``#key=value,key=value``.

Examples: ``camvid:/data/camvid#split=val``, ``folder:~/my_data#num_classes=5,cache=true``,
``synthetic#split=val,num_images=32``. Option values are converted: ``true``/``false`` to bool,
integers to int, other numbers to float, anything else stays a string.

Every dataset also takes ``images=START:STOP[:STEP]``, a Python-style slice of its (sorted) samples,
e.g. ``camvid:/data/camvid#split=val,images=0:50`` and ``...,images=50:`` for two disjoint halves, or
``images=0::2`` and ``images=1::2`` for interleaved ones (video datasets: contiguous halves are
different sequences).

Several sources form one dataset with ``+``: ``SPEC+SPEC[+...]``, e.g. ``folder:/data/real+synthetic``
or ``camvid:/d#images=0:50+camvid:/d#images=100:``. A ``+`` starts a new part only when a dataset name
follows it (``+synthetic`` at the end or before ``#``/``+``, or ``+NAME:``), so paths may hold ``+``.
Options after ``#`` belong to their part, except ``ratio=W1:W2[:...]`` on the last part: the training
sampling weights of the parts (``...+synthetic#ratio=3:1``: 3 real samples to 1 synthetic, however large
each part is). Every part must have the same class table.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trustseg.data.base import SegmentationDataset, subset
from trustseg.data.combined import CombinedDataset
from trustseg.data.datasets import LAYOUTS
from trustseg.errors import UserError

DATASET_NAMES: tuple[str, ...] = ("synthetic", *LAYOUTS)

# A "+" that begins the next part of a combined spec: followed by a dataset name and ":" (or, for
# synthetic, by the end, "#" or "+"). Any other "+" is part of a path.
_PART_START = re.compile(
    r"\+(?=\s*(?:synthetic\s*(?:$|[#+])|(?:" + "|".join(map(re.escape, LAYOUTS)) + r")\s*:))", re.IGNORECASE
)


def split_parts(spec: str) -> list[str]:
    """The part specs of ``SPEC+SPEC[+...]`` (a one-element list for a plain spec); see the module docstring."""
    return [part.strip() for part in _PART_START.split(spec)] if isinstance(spec, str) else [spec]


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: dataset name, path (None for ``synthetic``) and options."""

    name: str
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def _convert(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    for number in (int, float):
        try:
            return number(value)
        except ValueError:
            pass
    return value


def parse_spec(spec: str) -> DataSpec:
    """Split ``NAME[:PATH][#key=value,...]`` into its parts, checking the name and option syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty data spec; expected one of {', '.join(DATASET_NAMES)} (e.g. camvid:PATH)")
    if len(split_parts(spec)) > 1:
        raise UserError(f"data spec {spec!r} combines several datasets; expected a single one here")
    head, sep, tail = spec.strip().rpartition("#") if "#" in spec else (spec.strip(), "", "")
    name, colon, path = head.partition(":")
    name = name.strip().lower()
    if name not in DATASET_NAMES:
        raise UserError(f"data spec {spec!r}: unknown dataset {name!r}; expected one of "
                        f"{', '.join(DATASET_NAMES)} (as NAME:PATH, e.g. camvid:/data/camvid)")
    options: dict[str, Any] = {}
    for item in tail.split(",") if sep else ():
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise UserError(f"data spec {spec!r}: bad option {item!r}; expected key=value pairs after '#', "
                            f"separated by commas")
        if key in options:
            raise UserError(f"data spec {spec!r}: option {key!r} given twice")
        options[key] = _convert(value.strip())
    path = path.strip() if colon else None
    if name == "synthetic" and path:
        raise UserError(f"data spec {spec!r}: synthetic takes no path; use options, e.g. synthetic#num_images=32")
    if name != "synthetic" and not path:
        raise UserError(f"data spec {spec!r}: {name} needs a data folder, e.g. {name}:/path/to/{name}")
    return DataSpec(name, path or None, options)


def describe_spec(spec: str) -> str:
    """One line that says what a spec resolves to, for logs and help texts."""
    descriptions = []
    for part in split_parts(spec):
        parsed = parse_spec(part)
        where = f" at {parsed.path}" if parsed.path else ""
        options = ", ".join(f"{k}={v!r}" for k, v in parsed.options.items())
        descriptions.append(f"{parsed.name}{where}" + (f" ({options})" if options else ""))
    return " + ".join(descriptions)


def _check_options(spec: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    valid = sorted(["images", *(n for n, p in parameters.items()
                                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                and n != "root")])
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"data spec {spec!r}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


def resolve_split(spec: str, split: str | None, default: str) -> str | None:
    """The split a command reads: ``split`` when given, else the spec's ``#split=``, else ``default``.

    For a combined spec whose parts each name their split, None: every part keeps its own.
    """
    if split:
        return split
    parts = split_parts(spec)
    splits = [parse_spec(part).options.get("split") for part in parts]
    if len(parts) > 1 and any(s is not None for s in splits) and len(set(splits)) > 1:
        if None in splits:
            raise UserError(f"data spec {spec!r}: some parts set #split= and some do not; give every part its "
                            f"split, or none (then the command's split, here {default!r}, applies to all)")
        return None
    return splits[0] or default


def load_dataset(spec: str, split: str | None = None, **overrides: Any) -> SegmentationDataset:
    """Build the dataset a spec names, e.g. ``load_dataset("camvid:/data/camvid", split="val")``.

    Precedence: keyword arguments (``split``, ``overrides``) > options in the spec > defaults
    (split ``"train"``). ``split=None`` leaves the spec's choice alone. A combined spec ``A+B`` gives a
    :class:`~trustseg.data.combined.CombinedDataset` of its parts, each loaded this way.
    """
    parts = split_parts(spec)
    ratio = _pop_ratio(spec, parts)
    if len(parts) == 1:
        return _load_part(spec, split, overrides)
    datasets = [_load_part(part, split, overrides) for part in parts]
    return CombinedDataset(datasets, parts, ratio)


def _pop_ratio(spec: str, parts: list[str]) -> tuple[float, ...] | None:
    """Remove ``ratio=...`` from the last part (in place) and check it: one positive weight per part."""
    for part in parts[:-1]:
        if "ratio" in parse_spec(part).options:
            raise UserError(f"data spec {spec!r}: ratio= goes once, on the last part (e.g. A+B#ratio=1:1)")
    last = parse_spec(parts[-1])
    if "ratio" not in last.options:
        return None
    value = str(last.options["ratio"])
    if len(parts) == 1:
        raise UserError(f"data spec {spec!r}: ratio={value} needs several parts, e.g. A+B#ratio=1:1")
    try:
        weights = tuple(float(w) for w in value.split(":"))
    except ValueError:
        weights = ()
    if len(weights) != len(parts) or not all(w > 0 and w < float("inf") for w in weights):
        raise UserError(f"data spec {spec!r}: ratio={value}; expected {len(parts)} positive weights separated by "
                        f"':' (one per part), e.g. ratio={':'.join(['1'] * len(parts))}")
    head, _, tail = parts[-1].rpartition("#")
    kept = [item for item in tail.split(",") if item.partition("=")[0].strip() != "ratio"]
    parts[-1] = head + ("#" + ",".join(kept) if kept else "")
    return weights


def _load_part(spec: str, split: str | None, overrides: dict[str, Any]) -> SegmentationDataset:
    parsed = parse_spec(spec)
    options = {**parsed.options, **overrides}
    options["split"] = split if split is not None else options.get("split", "train")
    images = options.pop("images", None)
    if parsed.name == "synthetic":
        # lazy: the synthetic generator is only imported when asked for
        from trustseg.data.synthetic import SyntheticDataset

        factory = SyntheticDataset
        _check_options(spec, factory, options)
        dataset = factory(**options)
    else:
        factory = LAYOUTS[parsed.name]
        _check_options(spec, factory, options)
        dataset = factory(parsed.path, **options)
    return dataset if images is None else _select_images(spec, dataset, images)


def _select_images(spec: str, dataset: SegmentationDataset, value: Any) -> SegmentationDataset:
    """The ``images=START:STOP[:STEP]`` slice of `dataset`; an empty selection is an error."""
    parts = str(value).split(":")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
        selected = range(len(dataset))[slice(*bounds)] if len(parts) in (2, 3) else None
    except ValueError:
        selected = None
    if selected is None:
        raise UserError(f"data spec {spec!r}: images={value!r}; expected START:STOP[:STEP], e.g. images=0:50 "
                        "or images=1::2")
    if not selected:
        raise UserError(f"data spec {spec!r}: images={value} selects none of the {len(dataset)} images")
    return subset(dataset, selected)
