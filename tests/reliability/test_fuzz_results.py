"""Fuzzing results as they are read back: robustness.json as `--baseline` of another run, and the
journal (progress.jsonl) that `--resume` continues from.

Inputs: a valid robustness.json or journal truncated, bit-flipped or replaced by random bytes, and the
robustness.json's JSON with values replaced by any JSON value, keys deleted, or nested deeply.
Property: `load_baseline` returns conditions from which `summarize` computes the mCE; a resumed
`Journal` holds exactly units that were written (every unit, or all but a torn last one); or either
raises a one-line UserError naming the file.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cli_helpers import THREE_CLASSES
from fuzzing import fuzz_settings, mutated, outcome
from trustseg.engine.journal import JOURNAL, Journal
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError
from trustseg.robustness.summary import CLEAN, summarize
from trustseg.workflows.robustness import load_baseline

SETUP = {"checkpoint": "model.pt", "data": "folder:/d", "split": "val", "num_images": 2, "seed": 0}
KEYS = [CLEAN, "fog/1", "fog/2"]
OURS = {key: {"per_class": {"IoU": [0.5, 0.5, 0.5]}, "mIoU": 0.5 - 0.1 * i} for i, key in enumerate(KEYS)}


def valid_results() -> dict[str, Any]:
    conditions = {key: {"per_class": {"IoU": [0.5, 0.6, None], "Acc": [0.7, 0.8, None]}, "mIoU": 0.6 - 0.1 * i,
                        "mAcc": 0.7} for i, key in enumerate(KEYS)}
    return {"setup": SETUP, "class_names": list(THREE_CLASSES.names), "frost_source": "none",
            "conditions": conditions}


VALID = json.dumps(valid_results(), indent=2).encode()
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.floats(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_names = itertools.count()


def paths_in(value: Any, prefix: tuple = ()) -> list[tuple]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, inner in items:
        found += [(*prefix, key), *paths_in(inner, (*prefix, key))]
    return found


@st.composite
def damaged_json(draw: st.DrawFn) -> bytes:
    """robustness.json with 1-3 values replaced by any JSON value or deleted, or deeply nested."""
    if not draw(st.integers(0, 9)):  # conditions nested deeper than a JSON parser recurses
        depth = draw(st.sampled_from([10, 500, 5000]))
        return b'{"class_names": ["zero", "one", "two"], "conditions": ' + b"[" * depth + b"]" * depth + b"}"
    results = copy.deepcopy(valid_results())
    for _ in range(draw(st.integers(1, 3))):  # half of the edits inside the conditions, what is read most
        inside = paths_in(results["conditions"], ("conditions",)) if isinstance(results.get("conditions"), dict) else []
        path = draw(st.sampled_from(inside if inside and draw(st.booleans()) else paths_in(results)))
        parent = results
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.integers(0, 3)):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    return json.dumps(results).encode()


files = st.one_of(mutated(VALID, head=len(VALID)), damaged_json())


def number_or_nan(value: Any) -> bool:
    """A finite number or NaN (how the summary marks what is undefined), never None or text."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value)


@fuzz_settings(max_examples=200)
@given(data=files)
def test_baselines_load_or_refuse(tmp_path, data):
    path = tmp_path / f"b{next(_names)}.json"
    path.write_bytes(data)
    baseline = outcome("load_baseline", lambda: load_baseline(str(path), THREE_CLASSES, KEYS), str(path))
    if not isinstance(baseline, UserError):
        summary = summarize(OURS, ["fog"], [1, 2], baseline)
        assert number_or_nan(summary["mCE"]) and number_or_nan(summary["relative_mCE"]), summary


JOURNAL_SETUP = {"data": "folder:/d", "seed": 0}


def journal_bytes() -> bytes:
    """A journal of the three conditions of OURS, as a run that finished them writes it."""
    run_dir = RunDir(Path(tempfile.mkdtemp()))
    journal = Journal(run_dir, "robustness", JOURNAL_SETUP, resume=False)
    for key in KEYS:
        journal.record(key, OURS[key])
    return run_dir.file(JOURNAL).read_bytes()


VALID_JOURNAL = journal_bytes()


@fuzz_settings(max_examples=300)
@given(data=mutated(VALID_JOURNAL, head=len(VALID_JOURNAL)))
def test_journals_resume_exactly_what_was_written_or_refuse(tmp_path, data):
    run_dir = RunDir(tmp_path / f"r{next(_names)}")
    run_dir.file(JOURNAL).write_bytes(data)
    journal = outcome("Journal", lambda: Journal(run_dir, "robustness", JOURNAL_SETUP, resume=True), str(run_dir.path))
    if not isinstance(journal, UserError):  # a prefix of what was written (a torn line is done again)
        assert list(journal.done) == KEYS[: len(journal.done)]
        assert all(journal.done[key] == OURS[key] for key in journal.done)
