import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cli_helpers import MIXED_SIZES, mixed_size_folder, run_cli

import trustseg.training.loop as loop
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.data.spec import load_dataset
from trustseg.errors import UserError
from trustseg.engine.evaluate import evaluate
from trustseg.engine.inference import predictor_from_checkpoint
from trustseg.metrics.confusion import ConfusionMatrix
from trustseg.engine.rundir import to_plain
from trustseg.training import load_train_config, train
from trustseg.training.history import read_history


def test_tiny_run_writes_the_run_directory_and_learns(tiny_config):
    config = tiny_config("steps=12", "val_every=6", "optim.lr=0.02")
    result = train(config, progress=False)
    out = result.run_dir
    for name in ("best.pt", "last.pt", "metrics.json", "history.jsonl", "config.yaml", "loss.png", "val_miou.png"):
        assert (out / name).is_file(), name

    history = read_history(out)
    losses = [r["loss"] for r in history if r["kind"] == "train"]
    assert [r["step"] for r in history if r["kind"] == "val"] == [6, 12]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["stopped_by"] == "steps"
    assert metrics["mIoU"] == pytest.approx(history[-1]["mIoU"])
    assert metrics["best_mIoU"] == max(r["mIoU"] for r in history if r["kind"] == "val")
    assert len(metrics["per_class"]["IoU"]) == 7

    # config.yaml is a recipe that loads back into the same config
    assert load_train_config(out / "config.yaml") == config

    # last.pt is a complete checkpoint: evaluating it reproduces the final validation exactly
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint.training_state["step"] == 12
    val = load_dataset("synthetic#split=val,size=32,num_images=6")
    again = evaluate(predictor_from_checkpoint(checkpoint), val, [ConfusionMatrix(7)], progress=False)
    assert again["mIoU"] == metrics["mIoU"] and again["aAcc"] == metrics["aAcc"]
    best = load_checkpoint(out / "best.pt")
    assert best.training_state["step"] == metrics["best_step"]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "img_per_s")} for r in records]


def test_resumed_run_ends_with_bit_identical_weights(tiny_config, train_until_killed):
    overrides = ("steps=9", "val_every=4", "checkpoint_every=3", "data.color_jitter=0.2", "channels_last=true",
                 "data.base_size=[32,32]", "data.scale=[0.75,1.5]")
    reference = train(tiny_config(*overrides, out="whole"), progress=False)
    config = tiny_config(*overrides, out="interrupted")
    train_until_killed(config, step=6)
    assert load_checkpoint(config.out + "/last.pt").training_state["step"] == 6
    with pytest.raises(UserError, match="--resume"):
        train(config, progress=False)  # a fresh start must not overwrite the interrupted run

    resumed = train(config, resume=True, progress=False)

    whole = load_checkpoint(reference.run_dir / "last.pt")
    continued = load_checkpoint(resumed.run_dir / "last.pt")
    assert whole.state_dict.keys() == continued.state_dict.keys()
    for name, tensor in whole.state_dict.items():
        assert torch.equal(tensor, continued.state_dict[name]), name
    assert resumed.metrics["mIoU"] == reference.metrics["mIoU"]
    assert without_timing(read_history(resumed.run_dir)) == without_timing(read_history(reference.run_dir))


def test_a_killed_training_process_resumes_to_the_same_weights(tiny_config, tmp_path):
    overrides = ("steps=60", "val_every=30", "checkpoint_every=2")
    reference = train(tiny_config(*overrides, out="whole"), progress=False)
    config = tiny_config(*overrides, out="killed")
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump(to_plain(config)))
    last = Path(config.out) / "last.pt"
    process = subprocess.Popen([sys.executable, "-m", "trustseg.cli", "train", "--config", str(recipe), "--no-progress"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (last.is_file() and load_checkpoint(last).training_state["step"] >= 4):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was being written stays half-written
    process.wait()
    killed_at = load_checkpoint(last).training_state["step"]
    assert 4 <= killed_at < 60

    resumed = train(config, resume=True, progress=False)

    whole, continued = load_checkpoint(reference.run_dir / "last.pt"), load_checkpoint(last)
    for name, tensor in whole.state_dict.items():
        assert torch.equal(tensor, continued.state_dict[name]), name
    assert without_timing(read_history(resumed.run_dir)) == without_timing(read_history(reference.run_dir))


def test_resume_refuses_a_changed_config_or_a_missing_run(tiny_config):
    with pytest.raises(UserError, match="no interrupted run"):
        train(tiny_config(out="nothing"), resume=True, progress=False)
    finished = train(tiny_config("steps=2"), progress=False)
    with pytest.raises(UserError, match=r"optim\.lr"):
        train(tiny_config("steps=2", "optim.lr=0.5"), resume=True, progress=False)
    # resuming a finished run only validates again, without a second history entry
    again = train(tiny_config("steps=2", "data.num_workers=1"), resume=True, progress=False)
    assert again.step == 2 and again.metrics["mIoU"] == finished.metrics["mIoU"]
    assert [r["kind"] for r in read_history(again.run_dir)] == ["train", "train", "val"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    real_loss = loop.segmentation_loss
    calls = []

    def loss_nan_at_step_5(logits, target, **kwargs):
        calls.append(1)
        loss = real_loss(logits, target, **kwargs)
        return loss * math.nan if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "segmentation_loss", loss_nan_at_step_5)
    config = tiny_config("checkpoint_every=2")
    with pytest.raises(UserError) as error:
        train(config, progress=False)
    message = str(error.value)
    assert "step 5" in message and "loss is nan" in message and "(step 4) is kept" in message
    assert "\n" not in message
    kept = load_checkpoint(config.out + "/last.pt")
    assert kept.training_state["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept.state_dict.values() if t.is_floating_point())


def test_crop_must_fit_the_model_stride(tiny_config):
    with pytest.raises(UserError, match=r"data\.crop=\[30, 32\] is not a multiple of unet's input stride 4; "
                                        r"use e\.g\. data\.crop=\[32, 32\]"):
        train(tiny_config("data.crop=[30,32]"), progress=False)


def test_time_budget_stops_the_run(tiny_config):
    config = tiny_config("steps=null", "time_budget_min=0.01")  # 0.6 s
    result = train(config, progress=False)
    assert result.stopped_by == "time_budget"
    assert result.elapsed_s >= 0.6
    # It stops at the first step that ends past the budget: every earlier step was logged (log_every=1)
    # before the 0.6 s mark, and no step runs after it.
    steps = [r for r in read_history(config.out) if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, result.step + 1))
    assert all(r["elapsed_s"] < 0.6 for r in steps[:-1])


def test_class_weights_and_ohem_run_end_to_end(tiny_config):
    config = tiny_config("steps=2", "loss.class_weights=median_frequency", "loss.ohem_threshold=0.3",
                         "loss.ohem_min_kept=0.2")
    train(config, progress=False)
    weights = load_checkpoint(config.out + "/last.pt").training_state["class_weights"]
    assert weights.shape == (7,) and torch.isfinite(weights).all() and (weights >= 0).all()
    saved = yaml.safe_load(open(config.out + "/config.yaml"))
    assert saved["loss"]["class_weights"] == "median_frequency"


def test_cli_train_on_a_combined_spec_of_mixed_sizes_validates_like_batch_size_1(tiny_values, tmp_path, monkeypatch):
    # two sources with one class table, drawn 1:3; images of several sizes; validation 4 images a batch
    first = mixed_size_folder(tmp_path / "first")
    second = mixed_size_folder(tmp_path / "second+more", sizes=((10, 13), (12, 16), (21, 9)), seed=1)
    spec = f"folder:{first}+folder:{second}#ratio=1:3"
    values = {**tiny_values, "steps": 4, "val_every": 4, "batch_size": 2,
              "data": {"train": "synthetic", "crop": [8, 8], "val_batch_size": 4}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    code = run_cli(["train", "--config", str(recipe), "--data", spec, "--out", str(out), "--no-progress"], monkeypatch)
    assert code in (0, None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 4 and len(metrics["per_class"]["IoU"]) == 3
    # the run validated on both parts together (split=val: each part whole) at batch size 4
    val = load_dataset(spec, split="val")
    assert len(val) == len(MIXED_SIZES) + 3
    single = evaluate(predictor_from_checkpoint(load_checkpoint(out / "last.pt")), val, [ConfusionMatrix(3)],
                      batch_size=1, progress=False)
    assert single["mIoU"] == metrics["mIoU"] and single["aAcc"] == metrics["aAcc"]


def test_cli_train_refuses_parts_with_different_classes(tiny_values, tmp_path, monkeypatch, capsys):
    first = mixed_size_folder(tmp_path / "first")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_values, "data": {**tiny_values["data"], "val": None}}))
    code = run_cli(["train", "--config", str(recipe), "--data", f"folder:{first}+synthetic", "--out",
                    str(tmp_path / "run"), "--no-progress"], monkeypatch)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"'folder:{first}' has 3 classes but 'synthetic' has 7" in err


def test_multi_resolution_training_varies_the_crop_at_about_constant_pixels(tiny_config, monkeypatch):
    shapes = []
    original = loop._Run._train_step

    def spy(run, images, masks):
        shapes.append((images.shape[0], *images.shape[-2:], *masks.shape[-2:]))
        return original(run, images, masks)

    monkeypatch.setattr(loop._Run, "_train_step", spy)
    result = train(tiny_config("steps=10", "data.crop_scales=[0.75,1.0]"), progress=False)
    assert result.step == 10
    assert set(shapes) == {(7, 24, 24, 24, 24), (4, 32, 32, 32, 32)}  # 7 x 24^2 ~ 4 x 32^2 pixels
    history = [r for r in read_history(result.run_dir) if r["kind"] == "train"]
    assert all(r["img_per_s"] > 0 for r in history)
    with pytest.raises(UserError, match="smaller than one batch of 16"):
        train(tiny_config("steps=2", "data.crop_scales=[0.5,1.0]", out="too_big"), progress=False)


def test_cli_train_writes_its_report_unless_told_not_to(tiny_values, tmp_path, monkeypatch):
    data = mixed_size_folder(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_values, "steps": 2, "batch_size": 2,
                                      "data": {"train": "synthetic", "crop": [8, 8], "val_batch_size": 2}}))
    for flag, written in (("--report", True), ("--no-report", False)):
        out = tmp_path / flag
        assert run_cli(["train", "--config", str(recipe), "--data", f"folder:{data}", "--out", str(out), flag,
                        "--no-progress"], monkeypatch) in (0, None)
        assert (out / "metrics.json").is_file() and (out / "report.html").is_file() == written
