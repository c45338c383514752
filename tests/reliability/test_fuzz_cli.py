"""Fuzzing the command line: `trustseg eval`, `predict` and `info` on fuzzed files, specs and options.

Inputs: a valid checkpoint or one truncated, bit-flipped or replaced by random bytes; data specs that
work, that name missing or odd paths (brackets included), wrong options or a dataset of other classes,
and random text; images for `predict` that are valid, mutated or random; `--out` folders that are new,
nested or an existing file.
Property: the command exits 0 with a run directory, or 2 with exactly one line on stderr; never a
traceback or a hang; and nothing is created, changed or deleted outside `--out` (the inputs and the
working directory are compared before and after).
"""

from __future__ import annotations

import io
import itertools
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from cli_helpers import mixed_size_folder, run_cli, save_tiny_unet
from fuzzing import fuzz_settings, mutated, time_limit
from trustseg.data.base import ClassInfo

_names = itertools.count()


# class names that look like console markup: printed in tables, they must stay text
MARKUP_CLASSES = ClassInfo(names=("zero", "[/b]", "[red]two"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Pairs of a tiny U-Net checkpoint and a folder dataset of its classes: plain class names; names like
    console markup; and an image whose file name holds a line break, its mask of another size."""
    base = tmp_path_factory.mktemp("cli_inputs")
    save_tiny_unet(base / "model.pt")
    mixed_size_folder(base / "data", sizes=((8, 8), (9, 7), (6, 10)))
    save_tiny_unet(base / "markup.pt", MARKUP_CLASSES)
    mixed_size_folder(base / "markup", sizes=((8, 8), (7, 9)), classes=MARKUP_CLASSES)
    mixed_size_folder(base / "newline", sizes=((8, 8),))
    (base / "newline" / "images" / "img00.png").rename(base / "newline" / "images" / "line\nbreak.png")
    Image.new("L", (5, 5)).save(base / "newline" / "masks" / "line\nbreak.png")
    return {"base": base, "checkpoint": base / "model.pt", "data": base / "data",
            "markup_checkpoint": base / "markup.pt", "markup_data": base / "markup",
            "newline_checkpoint": base / "model.pt", "newline_data": base / "newline"}


@cache
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def snapshot(*roots: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots` except `skip` and what is under it: path -> (size, mtime) of a
    file, (0, 0) for a folder (whose own mtime changes when `skip` is created in it)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path == skip or skip in path.parents:
                continue
            info = path.stat()
            found[str(path)] = (info.st_size, info.st_mtime_ns) if path.is_file() else (0, 0)
    return found


def specs(data: Path, workspace: Path) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([
            f"folder:{data}", f"folder:{data}#split=val", f"folder:{data}#images=0:1", f"folder:{data}#images=5:",
            f"folder:{data}#num_classes=2", f"folder:{data}+folder:{data}#ratio=1:1", "synthetic#size=32,num_images=2",
            f"folder:{workspace}/missing/[/b]", f"folder:{workspace}/[bold]missing", f"folder:{data}#[x]=1",
            f"camvid:{data}", f"folder:{data}#split=", f"folder:{data}#split=[/b]", f"folder:{data}#cache=maybe",
            "folder:", "",
        ]),
        st.text(alphabet="folder:#+=,[]/ab ", max_size=20),
    )


@st.composite
def commands(draw: st.DrawFn, inputs: dict[str, Path], workspace: Path) -> list[str]:
    """A command line: eval, predict or info, with fuzzed files written under `workspace`."""
    folder = workspace / "in"
    folder.mkdir(parents=True)
    checkpoint = folder / "model.pt"
    pair = draw(st.sampled_from(["", "", "markup_", "newline_"]))
    valid, data = inputs[f"{pair}checkpoint"].read_bytes(), inputs[f"{pair}data"]
    checkpoint.write_bytes(valid if draw(st.booleans()) else draw(mutated(valid, head=512)))
    out = draw(st.sampled_from([workspace / "out", workspace / "out", workspace / "out" / "a" / "b",
                                workspace / "out" / "[" / "b]", workspace / "out" / "[red]", checkpoint]))
    command = draw(st.sampled_from(["eval", "eval", "predict", "info"]))
    common = ["--out", str(out), "--no-progress"]
    if command == "info":
        return ["info", "--data", draw(specs(data, workspace)), *common]
    if command == "eval":
        extra = draw(st.sampled_from([[], [], ["--max-images", "1"], ["--split", "val"], ["--mode", "slide"],
                                      ["--uncertainty", "entropy,margin"], ["--crop", "x", "--mode", "slide"]]))
        return ["eval", "--checkpoint", str(checkpoint), "--data", draw(specs(data, workspace)),
                "--device", "cpu", *extra, *common]
    images = folder / "images"
    images.mkdir()
    for i in range(draw(st.integers(0, 2))):
        (images / f"im{i}.png").write_bytes(png_bytes() if draw(st.booleans()) else draw(mutated(png_bytes())))
    target = draw(st.sampled_from([images, images / "im0.png", folder / "missing.png"]))
    return ["predict", "--checkpoint", str(checkpoint), "--input", str(target), "--device", "cpu", *common]


@fuzz_settings(max_examples=150)
@given(data=st.data())
def test_commands_exit_0_or_2_with_one_line_and_write_only_under_out(inputs, tmp_path, monkeypatch, capsys, data):
    workspace = tmp_path / f"w{next(_names)}"
    args = data.draw(commands(inputs, workspace))
    out = Path(args[args.index("--out") + 1])
    monkeypatch.chdir(workspace)  # a write to a relative path would land here, and be seen
    before = snapshot(workspace, inputs["base"], skip=workspace / "out")
    capsys.readouterr()
    with time_limit():
        code = run_cli(args, monkeypatch)
    err = capsys.readouterr().err.strip()
    event(f"{args[0]} exited {code}")
    assert code in (0, 2), (args, code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error:"), (args, err)
    else:
        assert (out / "config.yaml").is_file(), args
    assert snapshot(workspace, inputs["base"], skip=workspace / "out") == before, args
