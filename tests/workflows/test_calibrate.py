"""`trustseg calibrate` end to end on a tiny folder dataset and U-Net; the calibrated checkpoint in eval."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trustseg.calibrators import build_calibrator
from trustseg.data.transforms import collate
from trustseg.engine.checkpoint import load_checkpoint, save_checkpoint
from trustseg.data.base import ClassInfo
from trustseg.data.spec import load_dataset
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import predictor_from_checkpoint
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import ConfusionMatrix

from cli_helpers import banded_folder, folder_tree, run_cli, save_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 40
DECISION_PRESERVING = ("ts", "ccaffine", "ccaffine_argmax", "lts", "lts_ti", "ibts", "ibts_ti")


@pytest.fixture(scope="module")
def module_one_thread():
    """One torch thread for the module-scoped runs as well: the function-scoped `one_thread` only starts
    after them, and they are as small as the tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, module_one_thread):
    tmp = tmp_path_factory.mktemp("calibrate")
    root = banded_folder(tmp / "data", 6, H, W)
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
    assert methods["lts"]["fit"]["on"] == "logit-map crops + images"
    assert methods["ts"]["fit"]["nll_after"] <= methods["ts"]["fit"]["nll_before"] + 1e-9


def test_calibrated_checkpoint_reproduces_its_row_in_eval(run, setup, tmp_path, monkeypatch):
    out, results = run
    _, root, _ = setup
    saved = out / results["saved"]
    method = load_checkpoint(saved).calibrator["method"]
    selection = results["selection"]
    assert set(selection["candidates"]) == set(DECISION_PRESERVING)
    assert method == selection["chosen"] == min(DECISION_PRESERVING, key=lambda m: selection["scores"][m]["NLL"])
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
    (["--method", "vs,dirichlet"], "--save best chooses among argmax-preserving methods"),
    (["--holdout", "1.5"], "--holdout 1.5"),
    (["--allow-overlap", "--data", "nothing:x"], "unknown dataset 'nothing'"),
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


SELECTION_METHODS = "ts,ccaffine,vs,ms"
STEPS = 20  # enough for signal, not for perfect separation (on which the fits' optima run off to infinity)


def save_trained_unet(path, root):
    """The tiny U-Net fitted to the folder's six images (`STEPS` Adam steps), so that its confidences carry
    signal, then biased towards class 0 by the median margin that class lacks: half the other pixels
    flip to 0, a mistake vector scaling can undo (by changing decisions) and temperatures cannot."""
    save_tiny_unet(path)
    checkpoint = load_checkpoint(path)
    predictor = predictor_from_checkpoint(checkpoint, calibrated=False).train()
    dataset = load_dataset(f"folder:{root}")
    batch = collate([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(predictor(batch["image"]), batch["mask"], ignore_index=255).backward()
        optimizer.step()
    predictor.eval()
    with torch.no_grad():
        logits = predictor(batch["image"])
        top = logits.max(1).values
        lacking = (top - logits[:, 0])[logits.argmax(1) != 0]
        predictor.model.classifier.bias[0] += lacking.median() + 1e-3
    save_checkpoint(replace(checkpoint, state_dict=predictor.model.state_dict()), path)
    return predictor


@pytest.fixture(scope="module")
def selections(setup):
    """calibration.json of --save best on the evaluation images with their labels and with two
    adversarial label sets (the model's own decisions, and the next class after them), and of --save
    best-any; a trained model."""
    tmp, root, _ = setup
    model = tmp / "trained.pt"
    predictor = save_trained_unet(model, root)
    evaluated = {"best": f"folder:{root}#images=3:"}
    for name, shift in (("agree", 0), ("disagree", 1)):
        folder = folder_tree(tmp / name)
        for i in range(3, 6):
            shutil.copy(root / "images" / f"im{i}.png", folder / "images" / f"im{i}.png")
            image = torch.from_numpy(np.array(Image.open(root / "images" / f"im{i}.png"))).permute(2, 0, 1)
            with torch.no_grad():
                decisions = predictor(image[None]).argmax(1)[0].numpy()
            mask = np.array(Image.open(root / "masks" / f"im{i}.png"))
            Image.fromarray(np.where(mask == 255, 255, (decisions + shift) % 3).astype(np.uint8)).save(
                folder / "masks" / f"im{i}.png")
        evaluated[name] = f"folder:{folder}"
    runs = {}
    monkeypatch = pytest.MonkeyPatch()
    try:
        for name, data, save in (*((n, d, "best") for n, d in evaluated.items()),
                                 ("best-any", evaluated["best"], "best-any")):
            args = calibrate_args(model, root, tmp / name, "--method", SELECTION_METHODS, "--save", save)
            args[args.index("--data") + 1] = data
            assert run_cli(args, monkeypatch) == 0
            results = json.loads((tmp / name / "calibration.json").read_text())
            results["saved_method"] = load_checkpoint(tmp / name / results["saved"]).calibrator["method"]
            runs[name] = results
    finally:
        monkeypatch.undo()
    return runs


def test_best_is_chosen_on_held_out_fit_images_never_on_the_evaluation_data(selections):
    best = selections["best"]
    assert best["selection"]["holdout_images"] == 1 and best["setup"]["images"] == 2  # 3 fit images: 2 + 1
    chosen = best["selection"]["chosen"]
    for name in ("agree", "disagree"):
        assert selections[name]["selection"] == best["selection"] and selections[name]["saved_method"] == chosen

    def old_rule(results, methods):  # the lowest ECE on the evaluation data
        return min(methods, key=lambda m: results["conditions"]["clean"][m]["ECE"])

    # labels that agree with every decision reward the most confident method, labels that disagree with
    # every one the least confident: the old rule picks another method than `chosen` on one of them,
    # among all methods and among the argmax-preserving ones alike
    for methods in (SELECTION_METHODS.split(","), ["ts", "ccaffine"]):
        picks = {old_rule(selections[name], methods) for name in ("agree", "disagree")}
        assert picks != {chosen}, (methods, picks)


def test_best_never_chooses_a_decision_changing_method_and_best_any_can(selections):
    best, best_any = selections["best"], selections["best-any"]
    scores = best["selection"]["scores"]
    assert best_any["selection"]["scores"] == scores  # same fits on the same held-out images
    lowest = min(SELECTION_METHODS.split(","), key=lambda m: scores[m]["NLL"])
    assert not best["methods"][lowest]["properties"]["argmax_preserving"]  # this case needs a decision changer
    assert best_any["selection"]["chosen"] == best_any["saved_method"] == lowest
    assert best["selection"]["candidates"] == ["ts", "ccaffine"]
    assert best["methods"][best["saved_method"]]["properties"]["argmax_preserving"]


def test_fit_and_evaluation_data_sharing_images_are_refused_unless_allowed(setup, tmp_path, monkeypatch, capsys):
    _, root, model = setup
    args = calibrate_args(model, root, tmp_path / "o", "--method", "ts", "--save", "none")
    args[args.index("--fit-data") + 1] = f"folder:{root}#images=0:4"
    assert run_cli(args, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert "share 1 image(s)" in err and str((root / "images" / "im3.png").resolve()) in err
    assert "--allow-overlap" in err and len(err.splitlines()) == 1
    assert run_cli([*args, "--allow-overlap"], monkeypatch) == 0


def test_choosing_needs_a_fit_image_to_hold_out(setup, tmp_path, monkeypatch, capsys):
    _, root, model = setup
    args = calibrate_args(model, root, tmp_path / "o", "--method", "ts")
    args[args.index("--fit-data") + 1] = f"folder:{root}#images=0:1"
    assert run_cli(args, monkeypatch) == 2
    assert "holds out part of --fit-data" in capsys.readouterr().err
