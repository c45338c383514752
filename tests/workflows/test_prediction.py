"""`run_predict` with uncertainty maps: values against the softmax computed by hand, MC dropout seeded."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from trustseg.data.base import ClassInfo
from trustseg.data.classes import bit_palette
from trustseg.engine.checkpoint import Checkpoint, save_checkpoint
from trustseg.errors import UserError
from trustseg.models.factory import build_model
from trustseg.workflows.prediction import PredictConfig, run_predict

from cli_helpers import THREE_CLASSES, save_tiny_unet

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def reference_probs(model, path):
    """Softmax (K, H, W) float64 by hand: normalise, run (20 x 28 needs no padding for divisor 4)."""
    image = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model((image.float() / 255 - MEAN) / STD)[0].softmax(0).double().numpy()


def hand_entropy(p):
    return -(p * np.log(p)).sum(0) / math.log(len(p))


HAND = {
    "entropy": hand_entropy,
    "msp": lambda p: 1 - p.max(0),
    "margin": lambda p: 1 - (np.sort(p, 0)[-1] - np.sort(p, 0)[-2]),
}


def predict(images, out, checkpoint, **options):
    return run_predict(PredictConfig(checkpoint=str(checkpoint), input=str(images), out=str(out), progress=False, **options))


@pytest.mark.parametrize("method", sorted(HAND))
def test_softmax_maps_match_the_formulas_and_the_heatmaps_show_them(tmp_path, images, method):
    model = save_tiny_unet(tmp_path / "unet.pt")
    result = predict(images, tmp_path / "out", tmp_path / "unet.pt", uncertainty=method)
    for i, outputs in enumerate(result.outputs):
        values = np.load(outputs["uncertainty"])
        assert values.dtype == np.float32 and values.shape == (20, 28)
        np.testing.assert_allclose(values, HAND[method](reference_probs(model, images / f"im{i}.png")), atol=1e-6)
        heat = np.asarray(Image.open(tmp_path / "out" / "uncertainty" / f"im{i}.png"))
        assert np.array_equal(heat, colormaps["inferno"](values, bytes=True)[..., :3])


def save_segformer(path, **rates):
    torch.manual_seed(0)
    options = {"decoder_dim": 16, **rates}
    model = build_model("segformer", num_classes=3, **options)
    save_checkpoint(Checkpoint({"name": "segformer", "options": options}, model.state_dict(), THREE_CLASSES), path)


def test_mc_dropout_map_is_seeded_and_leaves_the_labels_alone(tmp_path, images):
    save_segformer(tmp_path / "seg.pt")

    def run(name, **options):
        outputs = predict(images / "im0.png", tmp_path / name, tmp_path / "seg.pt", **options).outputs[0]
        labels = np.asarray(Image.open(outputs["labels"]))
        return labels, np.load(outputs["uncertainty"]) if "uncertainty" in outputs else None

    labels, _ = run("plain")
    mc_labels, first = run("a", uncertainty="mc-dropout", mc_samples=3, seed=0)
    _, again = run("b", uncertainty="mc-dropout", mc_samples=3, seed=0)
    _, other = run("c", uncertainty="mc-dropout", mc_samples=3, seed=1)
    assert np.array_equal(labels, mc_labels)
    assert first.shape == (20, 28) and first.dtype == np.float32
    assert 0 < first.min() and first.max() <= 1
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize(
    "model,fix",
    [
        ("unet", "model 'unet' has no dropout option; use --uncertainty entropy|msp|margin instead"),
        ("segformer", "e.g. --set model.options.drop_path_rate=0.1 (segformer options: drop_path_rate, dropout)"),
    ],
)
def test_mc_dropout_without_dropout_fails_before_writing(tmp_path, images, model, fix):
    path = tmp_path / "model.pt"
    save_tiny_unet(path) if model == "unet" else save_segformer(path, dropout=0.0, drop_path_rate=0.0)
    with pytest.raises(UserError, match="MC dropout needs dropout") as info:
        predict(images, tmp_path / "out", path, uncertainty="mc-dropout")
    assert str(info.value).endswith(fix)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options,message",
    [({"uncertainty": "variance"}, "--uncertainty 'variance': expected one of entropy, msp, margin, mc-dropout"),
     ({"mc_samples": 0}, "--mc-samples 0: expected an integer >= 1")],
)
def test_bad_uncertainty_options_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        PredictConfig(checkpoint="m.pt", input="in", out="out", **options)


def test_outputs_keep_subfolders_and_colliding_stems_keep_their_suffix(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    files = ["a.png", "a.jpg", "b.png", "sub/a.png", "sub/deeper/c.bmp"]
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / name)
    model = save_tiny_unet(tmp_path / "unet.pt")
    result = predict(folder, folder / "out", tmp_path / "unet.pt")  # --out inside --input is not re-read
    labels = {str(o["image"].relative_to(folder)): o["labels"].relative_to(folder / "out" / "labels")
              for o in result.outputs}
    assert labels == {"a.jpg": Path("a.jpg.png"), "a.png": Path("a.png.png"), "b.png": Path("b.png"),
                      "sub/a.png": Path("sub/a.png"), "sub/deeper/c.bmp": Path("sub/deeper/c.png")}
    # every image got its own labels: each file holds the prediction of its own image
    for output in result.outputs:
        written = np.asarray(Image.open(output["labels"]))
        assert np.array_equal(written, reference_probs(model, output["image"]).argmax(0)), output["image"]
    assert len({o["overlay"] for o in result.outputs}) == len(files)


def test_labels_are_16_bit_above_255_classes(tmp_path, images):
    classes = ClassInfo(names=tuple(f"c{i}" for i in range(300)), palette=bit_palette(300))
    torch.manual_seed(0)
    model = build_model("unet", num_classes=300, base_width=4, depth=2)
    with torch.no_grad():  # push the predictions above 255, where 8-bit labels would wrap
        model.classifier.bias[260:] += 5.0
    save_checkpoint(Checkpoint({"name": "unet", "options": {"base_width": 4, "depth": 2}}, model.state_dict(), classes),
                    tmp_path / "wide.pt")
    output = predict(images / "im0.png", tmp_path / "out", tmp_path / "wide.pt").outputs[0]
    written = np.asarray(Image.open(output["labels"]))
    expected = reference_probs(model.eval(), images / "im0.png").argmax(0)
    assert written.dtype == np.uint16 and expected.max() > 255
    assert np.array_equal(written, expected)


def test_the_summary_counts_each_images_predicted_pixels_and_the_report_ranks_by_uncertainty(tmp_path, images):
    save_tiny_unet(tmp_path / "unet.pt")
    out = tmp_path / "out"
    predict(images, out, tmp_path / "unet.pt", uncertainty="entropy")
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["class_names"] == list(THREE_CLASSES.names) and summary["uncertainty"] == "entropy"
    for entry in summary["images"]:
        labels = np.asarray(Image.open(out / "labels" / f"{entry['name']}.png"))
        assert entry["size"] == list(labels.shape)
        assert entry["class_pixels"] == [int((labels == k).sum()) for k in range(3)]
        assert entry["mean_uncertainty"] == pytest.approx(np.load(out / "uncertainty" / f"{entry['name']}.npy").mean())
        assert (out / entry["files"]["overlay"]).is_file() and (out / entry["files"]["uncertainty_png"]).is_file()
    report = (out / "report.md").read_text()
    ranked = sorted(summary["images"], key=lambda e: -e["mean_uncertainty"])
    assert "Most uncertain images" in report
    assert report.index(f"| {ranked[0]['name']} |") < report.index(f"| {ranked[1]['name']} |")
    assert "<img" in (out / "report.html").read_text()


def test_no_report_and_no_uncertainty(tmp_path, images):
    save_tiny_unet(tmp_path / "unet.pt")
    predict(images, tmp_path / "quiet", tmp_path / "unet.pt", report=False)
    assert not (tmp_path / "quiet" / "report.html").exists()
    assert json.loads((tmp_path / "quiet" / "predictions.json").read_text())["images"][0]["mean_uncertainty"] is None
    predict(images, tmp_path / "plain", tmp_path / "unet.pt")
    report = (tmp_path / "plain" / "report.md").read_text()
    assert "Predictions" in report and "Most uncertain images" not in report
