"""`trustseg calibrate` end to end on a tiny folder dataset and U-Net; the calibrated checkpoint in eval."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from trustseg.calibrators import build_calibrator
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.data.base import ClassInfo
from trustseg.data.spec import load_dataset
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import predictor_from_checkpoint
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import ConfusionMatrix

from cli_helpers import THREE_CLASSES, folder_tree, run_cli, save_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 40
DECISION_PRESERVING = ("ts", "ccaffine", "ccaffine_argmax", "lts", "lts_ti", "ibts", "ibts_ti")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calibrate")
    root = folder_tree(tmp / "data")
    rng = np.random.default_rng(0)
    palette = np.array(THREE_CLASSES.palette, np.uint8)
    for i in range(6):
        mask = np.zeros((H, W), np.uint8)
        mask[:, 10 + i:] = 1
        mask[H // 2:, 22:] = 2
        mask[:2] = 255
        image = palette[np.minimum(mask, 2)] // 2 + rng.integers(0, 100, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    model = tmp / "model.pt"
    save_tiny_unet(model)
    return tmp, root, model


def calibrate_args(model, root, out, *extra):
    return ["calibrate", "--checkpoint", str(model), "--fit-data", f"folder:{root}#images=0:3",
            "--data", f"folder:{root}#images=3:", "--out", str(out), "--epochs", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(setup):
    tmp, root, model = setup
    out = tmp / "all"
    monkeypatch = pytest.MonkeyPatch()
    try:
        assert run_cli(calibrate_args(model, root, out, "--corruptions", "gaussian_noise", "--severities", "2"),
                       monkeypatch) == 0
    finally:
        monkeypatch.undo()
    return out, json.loads((out / "calibration.json").read_text())


def test_every_method_is_fitted_and_evaluated_on_every_condition(run):
    out, results = run
    assert set(results["conditions"]) == {"clean", "gaussian_noise/2"}
    for condition in results["conditions"].values():
        assert list(condition) == ["uncalibrated", *results["methods"]]
    assert len(results["methods"]) == 12
    for name in ("report.md", "report.html", "reliability.png", results["saved"]):
        assert (out / name).is_file()


def test_uncalibrated_row_equals_a_plain_evaluation(run, setup):
    _, root, model = setup
    checkpoint = load_checkpoint(model)
    metrics = evaluate(predictor_from_checkpoint(checkpoint), load_dataset(f"folder:{root}#images=3:"),
                       [ConfusionMatrix(3), CalibrationHistogram(3)], progress=False)
    row = run[1]["conditions"]["clean"]["uncalibrated"]
    for key in ("mIoU", "ECE", "NLL", "Brier", "aECE"):
        assert row[key] == pytest.approx(metrics[key], abs=1e-9)


def test_decision_preserving_methods_change_no_pixel_and_no_miou(run):
    for condition in run[1]["conditions"].values():
        for method in DECISION_PRESERVING:
            assert condition[method]["decisions_changed"] == 0 and condition[method]["delta_mIoU"] == 0
        assert condition["uncalibrated"]["decisions_changed"] == 0


def test_methods_report_their_measured_properties(run):
    methods = run[1]["methods"]
    assert methods["ts"]["properties"] == dict.fromkeys(("translation_invariant", "argmax_preserving",
                                                         "order_preserving"), True)
    assert methods["vs"]["properties"]["translation_invariant"] is False
    assert methods["lts"]["fit"]["on"] == "logit maps + images"
    assert methods["ts"]["fit"]["nll_after"] <= methods["ts"]["fit"]["nll_before"] + 1e-9


def test_calibrated_checkpoint_reproduces_its_row_in_eval(run, setup, tmp_path, monkeypatch):
    out, results = run
    _, root, _ = setup
    saved = out / results["saved"]
    method = load_checkpoint(saved).calibrator["method"]
    assert method == min(results["methods"], key=lambda m: results["conditions"]["clean"][m]["ECE"])
    eval_dir = tmp_path / "eval"
    assert run_cli(["eval", "--checkpoint", str(saved), "--data", f"folder:{root}#images=3:", "--out",
                    str(eval_dir), "--no-progress"], monkeypatch) == 0
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(results["conditions"]["clean"][method]["mIoU"], abs=1e-9)


def test_checkpoint_calibrator_is_applied_to_the_logits(setup, tmp_path):
    _, _, model = setup
    checkpoint = load_checkpoint(model)
    calibrator = build_calibrator("vs", 3)
    with torch.no_grad():
        calibrator.weight.copy_(torch.tensor([0.5, 2.0, 1.0]))
        calibrator.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    checkpoint.calibrator = {"method": "vs", "state_dict": calibrator.state_dict()}
    images = torch.randint(0, 256, (1, 3, H, W), dtype=torch.uint8)
    with torch.no_grad():
        plain = predictor_from_checkpoint(checkpoint, calibrated=False)(images)
        calibrated = predictor_from_checkpoint(checkpoint)(images)
        assert torch.allclose(calibrated, calibrator(plain, images), atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--method", "platt"], "unknown calibration method 'platt'"),
    (["--save", "dirichlet", "--method", "ts"], "--save 'dirichlet'"),
    (["--corruptions", "rain"], "rain"),
])
def test_bad_arguments_exit_2_with_one_line(setup, tmp_path, monkeypatch, capsys, extra, message):
    _, root, model = setup
    assert run_cli(calibrate_args(model, root, tmp_path / "o", *extra), monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err


def test_fit_data_with_other_classes_or_no_labels_is_refused(setup, tmp_path, monkeypatch, capsys):
    _, root, model = setup
    args = calibrate_args(model, root, tmp_path / "o")
    fit = args.index("--fit-data") + 1
    five = folder_tree(tmp_path / "five", ClassInfo(names=tuple("abcde"), palette=((0, 0, 0),) * 5))
    for kind in ("images", "masks"):
        for path in (root / kind).iterdir():
            shutil.copy(path, five / kind / path.name)
    args[fit] = f"folder:{five}"
    assert run_cli(args, monkeypatch) == 2
    assert "has 5 classes but the checkpoint was trained with 3" in capsys.readouterr().err
    empty = folder_tree(tmp_path / "empty")
    for i in range(2):
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(empty / "images" / f"e{i}.png")
        Image.fromarray(np.full((H, W), 255, np.uint8)).save(empty / "masks" / f"e{i}.png")
    args[fit] = f"folder:{empty}"
    assert run_cli(args, monkeypatch) == 2
    assert "no labelled pixels" in capsys.readouterr().err
