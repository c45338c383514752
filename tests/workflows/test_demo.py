"""The demo end to end: a short run must produce every artefact; the full recipe must learn, and its
checkpoint drives `trustseg augment`."""

import json

import numpy as np
import pytest
from PIL import Image

from trustseg.workflows.demo import DemoConfig, run_demo

from cli_helpers import run_cli


def test_short_demo_writes_checkpoints_metrics_and_overlays(tmp_path):
    overrides = ("steps=6", "val_every=3", "data.train=synthetic#num_images=16,size=64", "batch_size=4")
    result = run_demo(DemoConfig(out=str(tmp_path / "demo"), overrides=overrides, num_overlays=2, progress=False))
    train_dir = tmp_path / "demo" / "train"
    assert {"best.pt", "last.pt", "metrics.json", "history.jsonl", "config.yaml"} <= {p.name for p in train_dir.iterdir()}
    metrics = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(result.eval.metrics["mIoU"])
    assert 0.0 <= metrics["mIoU"] <= 1.0
    assert len(result.overlays) == 2
    panel = np.asarray(Image.open(result.overlays[0]))
    assert panel.shape == (64, 3 * 64 + 8, 3)
    # Running the demo again into the same folder continues the finished run instead of failing.
    again = run_demo(DemoConfig(out=str(tmp_path / "demo"), overrides=overrides, num_overlays=0, progress=False))
    assert again.train.step == result.train.step


@pytest.mark.slow
def test_full_demo_reaches_090_val_miou(tmp_path, monkeypatch):
    result = run_demo(DemoConfig(out=str(tmp_path / "demo"), num_overlays=1, progress=False))
    assert result.eval.metrics["mIoU"] >= 0.90
    # The model scored is the one training ended with, not a checkpoint picked for its val score,
    # and evaluating it from disk reproduces training's own validation of it.
    assert result.train.best_step == result.train.step
    assert result.eval.metrics["mIoU"] == pytest.approx(result.train.metrics["mIoU"], abs=1e-4)

    # `trustseg augment` end to end on the demo checkpoint: its entropy picks the preserved classes
    out = tmp_path / "augment"
    assert run_cli(["augment", "--checkpoint", str(tmp_path / "demo" / "train" / "last.pt"), "--data",
                    "synthetic#split=train,num_images=4", "--out", str(out), "--tau", "0.1", "--no-progress"],
                   monkeypatch) in (0, None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selector"] == "entropy-high" and len(manifest["images"]) == 4
    for entry in manifest["images"]:
        assert entry["preserved_classes"] and entry["preserved_fraction"] > 0.1
        labels = np.asarray(Image.open(out / entry["mask"]))
        assert (labels != 255).mean() == pytest.approx(entry["labelled_fraction"])
        assert entry["labelled_fraction"] <= entry["preserved_fraction"]  # generated pixels are ignore
    assert (out / "preview.png").is_file() and (out / "report.html").is_file()
