"""Paths built from data stay inside their root: one check, used by the VOC lists and every output."""

import pytest

from trustseg.data import datasets
from trustseg.data.paths import inside
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError


@pytest.mark.parametrize("relative", ["a.png", "sub/a.png", "sub/../a.png", "./a.png", "a..b.png"])
def test_relative_paths_inside_are_kept(tmp_path, relative):
    path = inside(tmp_path, relative, "id")
    assert path.parent in (tmp_path, tmp_path / "sub") and ".." not in path.parts
    assert path.resolve() == (tmp_path / relative).resolve()


@pytest.mark.parametrize("relative", ["../a.png", "../../etc/passwd", "sub/../../a.png", "/etc/passwd", "..", "",
                                      ".", "a\0b"])
def test_paths_leaving_the_root_are_refused(tmp_path, relative):
    with pytest.raises(UserError, match=r"^id .* leads outside .*; expected a relative path inside it$"):
        inside(tmp_path, relative, "id")


def test_voc_split_list_cannot_name_files_outside_the_dataset(voc_root):
    outside = voc_root.parent / "secret.jpg"
    outside.write_bytes(b"not an image")  # exists: only the containment check can stop it
    (voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n../../secret\n")
    with pytest.raises(UserError, match=r"val\.txt: sample id '\.\./\.\./secret\.jpg' leads outside"):
        datasets.voc(voc_root, "val")


def test_run_dir_files_stay_in_the_run_dir(tmp_path):
    run_dir = RunDir(tmp_path / "out")
    assert run_dir.file("labels/a.png") == tmp_path / "out" / "labels" / "a.png"
    with pytest.raises(UserError, match="output '../escape.json' leads outside"):
        run_dir.write_json("../escape.json", {})
    assert not (tmp_path / "escape.json").exists()
