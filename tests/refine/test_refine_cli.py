"""`--refine` end to end: eval, robustness and calibrate run the refined predictor and record its cost."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from trustseg.refine.refiner import RefineConfig, refine_logits

from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.models.factory import build_model

from cli_helpers import THREE_CLASSES, banded_folder, run_cli, save_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 40
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture()
def setup(tmp_path):
    root = banded_folder(tmp_path / "data", 4, H, W)
    model = save_tiny_unet(tmp_path / "model.pt")
    return root, tmp_path / "model.pt", model


def oracle_metrics(model, root, images, config):
    """(mIoU, NLL) by hand: the model, `refine_logits` on its logits (unless `config` is None) with the
    U-Net's decoder output as its features, torchmetrics mIoU and the mean negative log-likelihood of the
    labelled pixels."""
    preds, targets, nll = [], [], []
    for i in images:
        image = torch.from_numpy(np.array(Image.open(root / "images" / f"im{i}.png"))).permute(2, 0, 1)[None]
        with torch.no_grad():
            x = (image.float() / 255 - MEAN) / STD
            logits, features = model(x), model.forward_features(x)
        refined = logits if config is None else refine_logits(logits, image.float(), config, features)
        target = torch.from_numpy(np.asarray(Image.open(root / "masks" / f"im{i}.png")).astype(np.int64))
        preds.append(refined[0].argmax(0))
        targets.append(target)
        labelled = target != 255
        nll.append(-refined[0].log_softmax(0).permute(1, 2, 0)[labelled].gather(1, target[labelled][:, None]))
    metric = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)
    return metric(torch.stack(preds), torch.stack(targets)).item(), torch.cat(nll).mean().item()


REFINE = ["--refine", "--refine-iters", "3", "--refine-q", "50"]
CONFIG = RefineConfig(percent=50, iterations=3)


def test_eval_and_robustness_run_the_refined_predictor(setup, tmp_path, monkeypatch):
    root, path, model = setup
    expected, nll = oracle_metrics(model, root, range(4), CONFIG)
    assert nll != pytest.approx(oracle_metrics(model, root, range(4), None)[1], abs=1e-4)  # refinement shows
    assert run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "e"),
                    "--no-progress", *REFINE], monkeypatch) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(expected, abs=1e-6) and metrics["NLL"] == pytest.approx(nll, rel=1e-4)
    assert metrics["refine_ms_per_image"] > 0 and "mBIoU" in metrics
    assert run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "plain"),
                    "--no-progress"], monkeypatch) == 0
    assert "refine_ms_per_image" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())

    assert run_cli(["robustness", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "r"),
                    "--corruptions", "contrast", "--severities", "3", "--no-progress", *REFINE], monkeypatch) == 0
    results = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert results["conditions"]["clean"]["mIoU"] == pytest.approx(expected, abs=1e-6)
    assert results["conditions"]["clean"]["NLL"] == pytest.approx(nll, rel=1e-4)
    assert all(c["refine_ms_per_image"] > 0 for c in results["conditions"].values())
    assert results["setup"]["inference"]["refine"]["percent"] == 50


def test_calibrate_fits_and_evaluates_on_refined_logits(setup, tmp_path, monkeypatch):
    root, path, model = setup
    args = ["calibrate", "--checkpoint", str(path), "--fit-data", f"folder:{root}#images=0:2",
            "--data", f"folder:{root}#images=2:", "--out", str(tmp_path / "c"), "--method", "ts", "--save", "none",
            "--no-progress", *REFINE]
    assert run_cli(args, monkeypatch) == 0
    results = json.loads((tmp_path / "c" / "calibration.json").read_text())
    expected, nll = oracle_metrics(model, root, range(2, 4), CONFIG)
    uncalibrated = results["conditions"]["clean"]["uncalibrated"]
    assert uncalibrated["mIoU"] == pytest.approx(expected, abs=1e-6) and uncalibrated["NLL"] == pytest.approx(nll, rel=1e-4)
    assert results["setup"]["refine_ms_per_image"] > 0


@pytest.mark.parametrize("guide", ["features", "both"])
def test_eval_refines_with_the_models_features(setup, tmp_path, monkeypatch, guide):
    root, path, model = setup
    config = RefineConfig(percent=50, iterations=3, guide=guide)
    expected, nll = oracle_metrics(model, root, range(4), config)
    assert nll != pytest.approx(oracle_metrics(model, root, range(4), CONFIG)[1], abs=1e-4)  # the guide shows
    assert run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "e"),
                    "--no-progress", *REFINE, "--refine-guide", guide], monkeypatch) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(expected, abs=1e-6) and metrics["NLL"] == pytest.approx(nll, rel=1e-4)


def test_a_model_without_a_classifier_layer_cannot_guide_by_features(tmp_path, monkeypatch, capsys):
    root = banded_folder(tmp_path / "data", 2, H, W)
    options = {"backbone": "vit_ti16", "depth": 1, "pos": "none", "head": "mask"}
    model = build_model("vit_segmenter", num_classes=3, **options)
    save_checkpoint(Checkpoint({"name": "vit_segmenter", "options": options}, model.state_dict(), THREE_CLASSES),
                    tmp_path / "m.pt")
    code = run_cli(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", f"folder:{root}", "--out",
                    str(tmp_path / "e"), "--no-progress", "--refine", "--refine-guide", "features"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "use --refine-guide image" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", ["0", "-1", "100.5", "nan"])
def test_share_outside_0_100_exits_2_with_one_line(setup, tmp_path, monkeypatch, capsys, value):
    root, path, _ = setup
    code = run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(tmp_path / "e"),
                    "--no-progress", "--refine", "--refine-q", value], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--refine-q" in err and "(0, 100]" in err
