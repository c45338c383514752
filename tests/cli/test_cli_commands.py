"""The CLI commands end to end on tiny folder datasets, checked against independent computations."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from trustseg.data.base import ClassInfo

from cli_helpers import folder_tree, run_cli as run_trustseg, save_tiny_unet

CLASSES = ClassInfo(names=("zero", "one", "two"), palette=((0, 0, 0), (255, 0, 0), (0, 255, 0)))


def run_cli(args, monkeypatch):
    assert run_trustseg(args, monkeypatch) == 0


@pytest.fixture()
def folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    folder_tree(root)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        mask = rng.integers(0, 3, (20, 28)).astype(np.uint8)
        mask[:2] = 255  # ignored band
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    return path, save_tiny_unet(path)


def reference_predictions(model, root):
    """Predictions computed by hand: normalise, pad to the divisor, run, crop, argmax."""
    preds, targets = [], []
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for i in range(3):
        image = torch.from_numpy(np.array(Image.open(root / "images" / f"im{i}.png"))).permute(2, 0, 1)[None]
        x = torch.nn.functional.pad((image.float() / 255 - mean) / std, (0, 32 - 28))  # width 28 -> 32 (divisor 4)
        with torch.no_grad():
            preds.append(model(x)[0, :, :20, :28].argmax(0))
        targets.append(torch.from_numpy(np.asarray(Image.open(root / "masks" / f"im{i}.png")).astype(np.int64)))
    return torch.stack(preds), torch.stack(targets)


def test_eval_matches_torchmetrics_and_writes_run_dir(tmp_path, folder_dataset, checkpoint, monkeypatch):
    path, model = checkpoint
    out = tmp_path / "eval"
    run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{folder_dataset}", "--out", str(out), "--no-progress"], monkeypatch)
    metrics = json.loads((out / "metrics.json").read_text())
    preds, targets = reference_predictions(model, folder_dataset)
    oracle = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)(preds, targets)
    assert metrics["mIoU"] == pytest.approx(oracle.item(), abs=1e-6)
    assert metrics["num_images"] == 3
    assert {"aAcc", "mAcc", "mDice", "fwIoU", "mBIoU", "mIoU_img"} <= set(metrics)
    assert len(metrics["per_class"]["IoU"]) == 3
    assert (out / "config.yaml").exists() and (out / "report.md").exists()


def test_predict_writes_labels_masks_overlays(tmp_path, folder_dataset, checkpoint, monkeypatch):
    path, model = checkpoint
    out = tmp_path / "pred"
    run_cli(["predict", "--checkpoint", str(path), "--input", str(folder_dataset / "images"), "--out", str(out), "--no-progress"], monkeypatch)
    preds, _ = reference_predictions(model, folder_dataset)
    for i in range(3):
        labels = np.asarray(Image.open(out / "labels" / f"im{i}.png"))
        assert np.array_equal(labels, preds[i].numpy())
        colour = np.asarray(Image.open(out / "masks" / f"im{i}.png"))
        assert np.array_equal(colour, np.asarray(CLASSES.palette, dtype=np.uint8)[labels])
        assert np.asarray(Image.open(out / "overlays" / f"im{i}.png")).shape == (20, 28, 3)


def test_predict_writes_uncertainty_maps(tmp_path, folder_dataset, checkpoint, monkeypatch):
    path, _ = checkpoint
    out = tmp_path / "pred"
    images = folder_dataset / "images"
    run_cli(["predict", "--checkpoint", str(path), "--input", str(images), "--out", str(out), "--uncertainty", "entropy",
             "--no-progress"], monkeypatch)
    for i in range(3):
        values = np.load(out / "uncertainty" / f"im{i}.npy")
        assert values.dtype == np.float32 and values.shape == (20, 28)
        assert 0 <= values.min() and values.max() <= 1
        assert np.asarray(Image.open(out / "uncertainty" / f"im{i}.png")).shape == (20, 28, 3)


def test_info_counts_pixels(tmp_path, folder_dataset, monkeypatch):
    out = tmp_path / "info"
    run_cli(["info", "--data", f"folder:{folder_dataset}", "--out", str(out), "--no-progress"], monkeypatch)
    info = json.loads((out / "info.json").read_text())
    masks = np.stack([np.asarray(Image.open(folder_dataset / "masks" / f"im{i}.png")) for i in range(3)])
    assert info["per_class"]["pixels"] == [int((masks == k).sum()) for k in range(3)]
    assert info["ignored_pixels"] == int((masks == 255).sum())
    assert (out / "class_frequencies.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Dataset" in report and "class_frequencies.png" in report


def test_eval_scores_mc_dropout_maps_as_error_detectors(tmp_path, folder_dataset, monkeypatch):
    """AUROC of the MC-dropout maps (drawn again here with the same seed) against the errors of the
    deterministic prediction, by torchmetrics on every pixel, within the histogram's own bound."""
    from torchmetrics.classification import BinaryAUROC

    from trustseg.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from trustseg.data.spec import load_dataset
    from trustseg.engine.inference import predictor_from_checkpoint
    from trustseg.models.factory import build_model
    from trustseg.engine.uncertainty_maps import mc_dropout, mc_dropout_maps

    torch.manual_seed(0)
    options = {"decoder_dim": 16, "dropout": 0.3}
    model = build_model("segformer", num_classes=3, **options)
    with torch.no_grad():  # a random SegFormer's softmax is nearly uniform: sharpen it, so pixels differ
        model.decoder.classifier.weight.mul_(300)
    path = tmp_path / "seg.pt"
    save_checkpoint(Checkpoint({"name": "segformer", "options": options}, model.state_dict(), CLASSES), path)
    out = tmp_path / "eval"
    run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{folder_dataset}", "--out", str(out), "--no-progress",
             "--uncertainty", "msp,mc-dropout,mutual-information", "--mc-samples", "3", "--seed", "5"], monkeypatch)
    metrics = json.loads((out / "metrics.json").read_text())

    predictor = predictor_from_checkpoint(load_checkpoint(path))
    dataset = load_dataset(f"folder:{folder_dataset}", split="val")
    scores, wrong = {"mc-dropout": [], "mutual-information": []}, []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            image, mask = sample["image"][None], sample["mask"]
            labelled = mask != 255
            wrong.append((predictor(image)[0].argmax(0) != mask)[labelled])
            for name, values in mc_dropout_maps(mc_dropout(predictor, image, samples=3, seed=5)).items():
                scores[name].append(values[0][labelled])
    wrong = torch.cat(wrong)
    for name, values in scores.items():
        oracle = BinaryAUROC()(torch.cat(values).double(), wrong.long())
        bound = metrics["histogram_error"][f"AUROC_{name}"]
        assert bound < 0.01 and abs(metrics[f"AUROC_{name}"] - oracle.item()) <= bound + 1e-6
    assert metrics["AUROC_mc-dropout"] != metrics["AUROC_msp"]
