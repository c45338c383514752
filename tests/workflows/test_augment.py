"""`trustseg augment` end to end: a tiny checkpoint on synthetic scenes, resume, bad input, training on
real + synthetic through the joined data spec."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml

import trustseg.workflows.augment as workflow
from cli_helpers import THREE_CLASSES, run_cli, save_tiny_unet
from trustseg.augment.selection import pixel_entropy, select
from trustseg.data.base import ClassInfo
from trustseg.data.readers import read_image, read_mask_array
from trustseg.data.spec import load_dataset
from trustseg.data.synthetic import CLASS_NAMES, PALETTE
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.inference import predictor_from_checkpoint

SCENES = ClassInfo(CLASS_NAMES, PALETTE)
DATA = "synthetic#size=32,num_images=4"
IGNORE = 255


class Killed(Exception):
    """The run stops here, as if killed."""


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest on a shared machine (tests/conftest.py)."""


@pytest.fixture
def checkpoint(tmp_path):
    save_tiny_unet(tmp_path / "model.pt", SCENES)
    return tmp_path / "model.pt"


def augment(monkeypatch, out, *extra):
    return run_cli(["augment", "--data", DATA, "--out", str(out), "--no-progress", *extra], monkeypatch)


def test_augment_writes_a_folder_dataset_that_keeps_only_preserved_original_pixels(tmp_path, checkpoint, monkeypatch):
    out = tmp_path / "synthetic"
    assert augment(monkeypatch, out, "--checkpoint", str(checkpoint), "--tau", "0.5") in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tau"] == 0.5 and manifest["backend"]["name"] == "opencv" and manifest["selector"] == "entropy-high"
    entries = manifest["images"]
    assert len(entries) == 4 and [e["rank"] for e in entries] == [0, 1, 2, 3]
    scores = [e["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)
    assert (out / "preview.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Synthetic data" in report and "preview.png" in report
    source = load_dataset(DATA)
    predictor = predictor_from_checkpoint(load_checkpoint(checkpoint))
    written = load_dataset(f"folder:{out}")
    assert written.classes.names == CLASS_NAMES and len(written) == 4
    for entry in entries:
        original = source[entry["source_index"]]
        # the selection is the one the entropy of the checkpoint's softmax gives
        with torch.no_grad():
            entropy = pixel_entropy(predictor(original["image"][None]).softmax(1))[0]
        expected = select(original["mask"], entropy, num_classes=7, tau=0.5, selector="entropy-high")
        assert entry["preserved_classes"] == list(expected.classes)
        assert entry["score"] == pytest.approx(expected.score, rel=1e-6)
        assert entry["seed"] == entry["source_index"] and entry["source"] == original["path"]
        image = read_image(out / entry["image"])
        labels = torch.from_numpy(read_mask_array(out / entry["mask"]).astype(np.int64))
        kept = labels != IGNORE
        assert kept.any()
        # every labelled pixel is an original pixel of a preserved class, with its original label
        assert torch.equal(labels[kept], original["mask"][kept])
        assert torch.equal(image[:, kept], original["image"][:, kept])
        assert set(labels[kept].unique().tolist()) <= set(entry["preserved_classes"])
        assert entry["labelled_fraction"] == pytest.approx(float(kept.double().mean()))


def test_an_interrupted_run_resumes_to_the_same_files(tmp_path, checkpoint, monkeypatch):
    args = ("--checkpoint", str(checkpoint), "--backend", "texture", "--selector", "random-class",
            "--preview-rows", "0")
    assert augment(monkeypatch, tmp_path / "whole", *args) in (0, None)
    original = workflow._write_sample
    written = []

    def write(*a, kill_at=None, **k):
        if len(written) + 1 == kill_at:
            raise Killed
        written.append(original(*a, **k))
        return written[-1]

    monkeypatch.setattr(workflow, "_write_sample", lambda *a, **k: write(*a, kill_at=3, **k))
    with pytest.raises(Killed):
        augment(monkeypatch, tmp_path / "cut", *args)
    assert augment(monkeypatch, tmp_path / "cut", *args) == 2  # a fresh run refuses the folder
    written.clear()
    monkeypatch.setattr(workflow, "_write_sample", write)
    assert augment(monkeypatch, tmp_path / "cut", *args, "--resume") in (0, None)
    assert len(written) == 2  # only the two images not finished before
    for folder in ("images", "masks"):
        names = sorted(p.name for p in (tmp_path / "whole" / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "cut" / folder).iterdir())
        for name in names:
            assert (tmp_path / "whole" / folder / name).read_bytes() == (tmp_path / "cut" / folder / name).read_bytes()
    whole, cut = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("whole", "cut"))
    assert whole == cut


def test_no_model_and_random_region_run_without_entropy(tmp_path, checkpoint, monkeypatch):
    assert augment(monkeypatch, tmp_path / "plain", "--selector", "no-model", "--num-samples", "2") in (0, None)
    entries = json.loads((tmp_path / "plain" / "manifest.json").read_text())["images"]
    assert [e["source_index"] for e in entries] == [0, 1]  # no score: dataset order
    assert all(e["score"] is None for e in entries)
    assert augment(monkeypatch, tmp_path / "box", "--checkpoint", str(checkpoint), "--selector", "random-region",
                   "--tau", "0.3") in (0, None)
    for entry in json.loads((tmp_path / "box" / "manifest.json").read_text())["images"]:
        top, left, h, w = entry["box"]
        assert h * w >= 0.3 * 32 * 32 and entry["preserved_fraction"] == pytest.approx(h * w / 32 ** 2)


@pytest.mark.parametrize("case", ["classes", "tau-zero", "tau-one", "no-folder", "no-diffusers", "no-checkpoint"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, checkpoint, monkeypatch, capsys, case):
    other = tmp_path / "three.pt"
    save_tiny_unet(other, THREE_CLASSES)
    args = {
        "classes": ["--checkpoint", str(other)],
        "tau-zero": ["--checkpoint", str(checkpoint), "--tau", "0"],
        "tau-one": ["--checkpoint", str(checkpoint), "--tau", "1.0"],
        "no-folder": ["--checkpoint", str(checkpoint), "--backend", "diffusers", "--model", str(tmp_path / "missing")],
        "no-diffusers": ["--checkpoint", str(checkpoint), "--backend", "diffusers", "--model", str(tmp_path)],
        "no-checkpoint": [],
    }[case]
    expected = {"classes": "has 7 classes but the checkpoint was trained with 3", "tau-zero": "--tau 0.0",
                "tau-one": "--tau 1.0", "no-folder": "does not exist", "no-diffusers": "needs the diffusers package",
                "no-checkpoint": "needs --checkpoint"}[case]
    if case == "no-diffusers":
        monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without it looks like to find_spec
    out = tmp_path / "out"
    assert augment(monkeypatch, out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not out.exists()


def test_the_synthetic_folder_trains_with_the_real_data_and_fine_tunes_from_the_checkpoint(tmp_path, checkpoint,
                                                                                         monkeypatch):
    out = tmp_path / "synthetic"
    code = augment(monkeypatch, out, "--checkpoint", str(checkpoint), "--tau", "0.5", "--preview-rows", "0")
    assert code in (0, None)
    recipe = {"seed": 0, "batch_size": 2, "steps": 3, "log_every": 1, "val_every": 0,
              "data": {"train": "synthetic", "val": "synthetic#split=val,size=32,num_images=2", "crop": [32, 32]},
              "model": {"name": "unet", "options": {"base_width": 4, "depth": 2}, "init_from": str(checkpoint)},
              "optim": {"lr": 2e-5}}  # fine-tuning at a low learning rate (Röhrich et al. 2026: 2e-5)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    joined = f"{DATA}+folder:{out}#ratio=1:1"
    run = tmp_path / "run"
    code = run_cli(["train", "--config", str(tmp_path / "recipe.yaml"), "--data", joined, "--out", str(run),
                    "--no-progress"], monkeypatch)
    assert code in (0, None)
    assert json.loads((run / "metrics.json").read_text())["step"] == 3
    weights = json.loads((run / "weights.json").read_text())
    assert weights["key"] == "model.init_from" and not weights.get("new")
    mixture = load_dataset(joined).mixture
    assert mixture.lengths == (4, 4) and mixture.ratio == (1.0, 1.0)
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["mIoU"])
