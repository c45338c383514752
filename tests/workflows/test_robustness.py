"""`trustseg robustness` and `trustseg corrupt` end to end on a tiny folder dataset and U-Net."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import trustseg.workflows.robustness as robustness_workflow
from trustseg.engine.journal import Journal
from trustseg.data.base import ClassInfo
from trustseg.engine.rundir import RunDir
from trustseg.errors import UserError
from trustseg.robustness.corruptions import corrupt
from trustseg.robustness.dataset import condition_seed
from trustseg.robustness.summary import summarize

from cli_helpers import banded_folder, run_cli as run_trustseg, save_tiny_unet

CLASSES = ClassInfo(names=("zero", "one", "two"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))
H, W = 40, 48


def run_cli(args, monkeypatch, code=0):
    assert run_trustseg(args, monkeypatch) == code


@pytest.fixture()
def dataset_root(tmp_path):
    """A folder dataset whose images carry their labels' colours plus texture, so a model can do well."""
    return banded_folder(tmp_path / "data", 3, H, W, boundaries=(W // 3, 2 * W // 3))


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    return path, save_tiny_unet(path, CLASSES)


def oracle_miou(model, root, corruption=None, severity=None):
    """mIoU computed by hand: corrupt each image with its per-image seed, normalise, run, torchmetrics."""
    preds, targets = [], []
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for i in range(3):
        image = torch.from_numpy(np.array(Image.open(root / "images" / f"im{i}.png"))).permute(2, 0, 1)[None]
        if corruption is not None:
            generator = torch.Generator().manual_seed(condition_seed(0, corruption, severity, i))
            image, _ = corrupt(image, corruption, severity, generator)
        with torch.no_grad():
            preds.append(model((image.float() / 255 - mean) / std)[0].argmax(0))
        targets.append(torch.from_numpy(np.asarray(Image.open(root / "masks" / f"im{i}.png")).astype(np.int64)))
    return MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)(torch.stack(preds), torch.stack(targets)).item()


def robustness_args(path, root, out, *extra):
    return ["robustness", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(out), "--no-progress", *extra]


def test_robustness_matches_hand_computed_miou_and_writes_report(tmp_path, dataset_root, checkpoint, monkeypatch):
    path, model = checkpoint
    out = tmp_path / "rob"
    run_cli(robustness_args(path, dataset_root, out, "--corruptions", "gaussian_noise,contrast,elastic_transform",
                            "--severities", "1,5"), monkeypatch)
    results = json.loads((out / "robustness.json").read_text())
    conditions = results["conditions"]
    assert set(conditions) == {"clean", *[f"{n}/{s}" for n in ("gaussian_noise", "contrast", "elastic_transform") for s in (1, 5)]}
    assert conditions["clean"]["mIoU"] == pytest.approx(oracle_miou(model, dataset_root), abs=1e-6)
    for name in ("gaussian_noise", "contrast"):
        assert conditions[f"{name}/5"]["mIoU"] == pytest.approx(oracle_miou(model, dataset_root, name, 5), abs=1e-6)
    summary = results["summary"]
    grid = [conditions[f"{n}/{s}"]["mIoU"] for n in ("gaussian_noise", "contrast", "elastic_transform") for s in (1, 5)]
    assert summary["mean_corrupted_mIoU"] == pytest.approx(np.mean(grid))
    assert summary["relative_robustness"] == pytest.approx(np.mean(grid) / conditions["clean"]["mIoU"])
    assert results["setup"]["frost_source"] in ("imagecorruptions", "procedural")
    for name in ("robustness_heatmap.png", "robustness_noise.png", "robustness_digital.png", "report.md",
                 "report.html", "metrics.json", "config.yaml"):
        assert (out / name).exists(), name
    assert "gaussian_noise" in (out / "report.md").read_text()


def test_resume_skips_finished_conditions_and_a_crash_keeps_them(tmp_path, dataset_root, checkpoint, monkeypatch, capsys):
    path, _ = checkpoint
    out = tmp_path / "rob"
    real_evaluate = robustness_workflow.evaluate
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(kwargs["description"])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_evaluate(*args, **kwargs)

    args = robustness_args(path, dataset_root, out, "--corruptions", "brightness", "--severities", "1-3")
    monkeypatch.setattr(robustness_workflow, "evaluate", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(args, monkeypatch)
    units = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()[1:]]
    assert [unit["unit"] for unit in units] == ["clean", "brightness/1"]

    capsys.readouterr()
    run_cli(args, monkeypatch, code=2)  # a finished unit is never overwritten without --resume
    assert "pass --resume" in capsys.readouterr().err
    counted = []
    monkeypatch.setattr(robustness_workflow, "evaluate", lambda *a, **k: counted.append(k["description"]) or real_evaluate(*a, **k))
    run_cli([*args, "--resume"], monkeypatch)
    assert [d.split(" ")[0] for d in counted] == ["brightness/2", "brightness/3"]
    assert "2 of 4 conditions already done and skipped, 2 to go" in capsys.readouterr().err
    assert set(json.loads((out / "robustness.json").read_text())["conditions"]) == {"clean", "brightness/1", "brightness/2", "brightness/3"}


def test_self_baseline_gives_unit_mce_and_bad_baselines_are_user_errors(tmp_path, dataset_root, checkpoint, monkeypatch, capsys):
    path, _ = checkpoint
    first = tmp_path / "first"
    run_cli(robustness_args(path, dataset_root, first, "--corruptions", "fog", "--severities", "2,4"), monkeypatch)
    second = tmp_path / "second"
    run_cli(robustness_args(path, dataset_root, second, "--corruptions", "fog", "--severities", "2,4",
                            "--baseline", str(first / "robustness.json")), monkeypatch)
    summary = json.loads((second / "robustness.json").read_text())["summary"]
    assert summary["mCE"] == pytest.approx(1.0)

    capsys.readouterr()
    run_cli(robustness_args(path, dataset_root, tmp_path / "third", "--corruptions", "fog", "--severities", "1-5",
                            "--baseline", str(first / "robustness.json")), monkeypatch, code=2)
    assert "lacks" in capsys.readouterr().err
    other = json.loads((first / "robustness.json").read_text())
    other["class_names"] = ["a", "b", "c"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    run_cli(robustness_args(path, dataset_root, tmp_path / "fourth", "--corruptions", "fog", "--severities", "2,4",
                            "--baseline", str(tmp_path / "other.json")), monkeypatch, code=2)
    assert "classes" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    b"\x80\x81",                                                      # not UTF-8
    b"[" * 5000 + b"]" * 5000,                                        # deeper than the JSON parser recurses
    b'{"class_names": [null], "conditions": {}}',
    b'{"class_names": ["zero", "one", "two"], "conditions": []}',
    b'{"class_names": ["zero", "one", "two"], "conditions": {"clean": {"mIoU": 0.5}}}',    # no per_class
    b'{"class_names": ["zero", "one", "two"], "conditions": {"clean": {"mIoU": "0.5", "per_class": {}}}}',
    b'{"class_names": ["zero", "one", "two"], "conditions": {"clean": {"mIoU": 2.0, "per_class": {}}}}',
])
def test_damaged_results_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "robustness.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a robustness.json written by trustseg robustness") as info:
        robustness_workflow.load_baseline(str(path), CLASSES, ["clean"])
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_null_miou_is_a_missing_baseline_condition_and_nan_when_recorded(tmp_path):
    conditions = {"clean": {"per_class": {}, "mIoU": 0.6}, "fog/2": {"per_class": {}, "mIoU": None}}  # NaN as written
    path = tmp_path / "robustness.json"
    path.write_text(json.dumps({"setup": {}, "class_names": list(CLASSES.names), "conditions": conditions}))
    with pytest.raises(UserError, match="lacks 1 of the conditions evaluated here \\(e.g. fog/2\\)"):
        robustness_workflow.load_baseline(str(path), CLASSES, ["clean", "fog/2"])
    journal = Journal(RunDir(tmp_path / "run"), "robustness", {}, resume=False)
    recorded = {key: robustness_workflow.nan_for_null(journal.record(key, {**value, "mIoU": value["mIoU"] or math.nan}))
                for key, value in conditions.items()}
    assert np.isnan(recorded["fog/2"]["mIoU"])
    assert np.isnan(summarize(recorded, ["fog"], [2])["relative_robustness"])


@pytest.mark.parametrize("args, message", [
    (["--corruptions", "rain"], "unknown corruption 'rain'"),
    (["--severities", "0-2"], "must lie in 1-5"),
    (["--severities", "six"], "cannot read severities"),
])
def test_bad_corruption_options_exit_2_with_one_line(tmp_path, dataset_root, checkpoint, monkeypatch, capsys, args, message):
    path, _ = checkpoint
    run_cli(robustness_args(path, dataset_root, tmp_path / "out", *args), monkeypatch, code=2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupted_copy_evaluates_like_on_the_fly_corruption(tmp_path, dataset_root, checkpoint, monkeypatch):
    path, _ = checkpoint
    copy = tmp_path / "copy"
    run_cli(["corrupt", "--data", f"folder:{dataset_root}", "--out", str(copy), "--corruptions", "shot_noise,elastic_transform",
             "--severities", "3", "--no-progress"], monkeypatch)
    assert (copy / "shot_noise" / "3" / "classes.txt").exists()
    original_mask = np.asarray(Image.open(dataset_root / "masks" / "im0.png"))
    assert np.array_equal(np.asarray(Image.open(copy / "shot_noise" / "3" / "masks" / "im0.png")), original_mask)
    warped = np.asarray(Image.open(copy / "elastic_transform" / "3" / "masks" / "im0.png"))
    assert warped.shape == original_mask.shape and not np.array_equal(warped, original_mask)
    assert set(np.unique(warped)) <= set(np.unique(original_mask))

    run_cli(robustness_args(path, dataset_root, tmp_path / "rob", "--corruptions", "shot_noise,elastic_transform",
                            "--severities", "3"), monkeypatch)
    conditions = json.loads((tmp_path / "rob" / "robustness.json").read_text())["conditions"]
    for name in ("shot_noise", "elastic_transform"):
        run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{copy / name / '3'}", "--out", str(tmp_path / name),
                 "--no-progress"], monkeypatch)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["mIoU"] == pytest.approx(conditions[f"{name}/3"]["mIoU"], abs=1e-9)


def test_gallery_png(tmp_path, dataset_root, monkeypatch):
    run_cli(["corrupt", "--data", f"folder:{dataset_root}", "--out", str(tmp_path / "g"), "--gallery",
             "--corruptions", "noise,fog", "--severities", "1,5", "--no-progress"], monkeypatch)
    picture = Image.open(tmp_path / "g" / "gallery.png")
    assert picture.width > 300 and picture.height > 300


def test_two_processes_give_the_one_process_conditions_and_resume_together(tmp_path, dataset_root, checkpoint):
    path, _ = checkpoint

    def torchrun(procs, out, severities, *extra):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m"]
        done = subprocess.run([*launcher, "trustseg.cli", *robustness_args(path, dataset_root, out, "--corruptions",
                               "impulse_noise,zoom_blur", "--severities", severities, *extra)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "robustness.json").read_text())["conditions"], done.stderr

    outs = {procs: torchrun(procs, tmp_path / f"p{procs}", "2")[0] for procs in (1, 2)}
    for key in outs[1]:
        assert outs[2][key]["mIoU"] == pytest.approx(outs[1][key]["mIoU"], abs=1e-12)
        assert outs[2][key]["per_class"]["IoU"] == pytest.approx(outs[1][key]["per_class"]["IoU"], abs=1e-12, nan_ok=True)
    # both processes learn the finished conditions from rank 0 and evaluate only the added ones
    extended, err = torchrun(2, tmp_path / "p2", "2,3", "--resume")
    assert "3 of 5 conditions already done and skipped, 2 to go" in err
    assert {key: extended[key] for key in outs[2]} == outs[2] and set(extended) - set(outs[2]) == {"impulse_noise/3", "zoom_blur/3"}
