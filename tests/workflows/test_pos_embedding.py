"""`trustseg experiment pos-embedding` on CI-sized synthetic data, checked against independent `eval`
runs of the models it trained; the position probe on tokens that do and do not carry their position."""

import json

import pytest
import torch

import trustseg.workflows.pos_embedding as experiment
from cli_helpers import run_cli
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.inference import InferenceConfig
from trustseg.models.positions import grid_positions, patch_units, probe_positions
from trustseg.workflows.evaluation import EvalConfig, run_eval

DATA = "synthetic#size=32,num_images=6"
TINY = ["--set", "model.options.depth=2", "--set", "data.crop=[32,32]", "--set", "batch_size=2",
        "--steps", "2", "--scales", "0.5,1,2", "--probe-images", "4", "--no-progress", "--device", "cpu"]


def test_probe_reads_positions_that_tokens_carry_and_not_others():
    torch.manual_seed(0)
    grid = (6, 8)
    where = grid_positions(grid) * patch_units(grid)

    def images(carry: bool, count: int):
        noise = [torch.randn(48, 16) for _ in range(count)]
        return [(torch.cat([where, n[:, :14]], 1) if carry else n, grid) for n in noise]

    knowing = probe_positions(images(True, 3), images(True, 2))
    assert knowing["error_patches"] < 0.01 < knowing["centre_error_patches"]
    blind = probe_positions(images(False, 10), images(False, 2))
    assert blind["error_patches"] > 0.8 * blind["centre_error_patches"]
    assert knowing["fit_tokens"] == 3 * 48 and knowing["test_tokens"] == 2 * 48


def test_experiment_trains_every_variant_and_its_numbers_match_eval(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    assert run_cli(["experiment", "pos-embedding", "--data", DATA, "--out", str(out), "--seeds", "1", *TINY],
                   monkeypatch) == 0
    results = json.loads((out / "pos_embedding.json").read_text())
    assert set(results["runs"]) == {"ape/seed0", "rope/seed0", "none/seed0", "asg/seed0"}
    for variant, pos in (("ape", "ape"), ("rope", "rope"), ("none", "none"), ("asg", "none")):
        checkpoint = load_checkpoint(out / "runs" / f"{variant}-seed0" / "last.pt")
        assert checkpoint.model["options"]["pos"] == pos
        assert ("asg_head" in checkpoint.training_state) == (variant == "asg")
        assert results["runs"][f"{variant}/seed0"]["steps"] == 2
    # the experiment's mIoU at x1 and x2 is what `trustseg eval` (with --scale) says of the same model
    path = out / "runs" / "asg-seed0" / "last.pt"
    for scale in (1.0, 2.0):
        evaluated = run_eval(EvalConfig(checkpoint=str(path), data=DATA, split="val", out=str(tmp_path / f"e{scale}"),
                                        inference=InferenceConfig(scale=scale), progress=False, device="cpu"))
        assert results["runs"]["asg/seed0"]["mIoU"][str(scale)] == pytest.approx(evaluated.metrics["mIoU"], abs=1e-12)
    summary = results["summary"]["asg"]["mIoU"]["1.0"]
    assert summary == {"mean": results["runs"]["asg/seed0"]["mIoU"]["1.0"], "std": 0.0, "n": 1}
    assert json.loads((out / "metrics.json").read_text())["mIoU_asg"] == summary["mean"]
    for name in ("report.md", "report.html", "resolution_transfer.png"):
        assert (out / name).exists(), name
    assert "ASG" in (out / "report.md").read_text()


def test_an_interrupted_experiment_resumes_without_training_again(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    args = ["experiment", "pos-embedding", "--data", DATA, "--out", str(out), "--seeds", "2", "--variants", "asg", *TINY]
    measure, measured = experiment.measure, []

    def stop_after_one(*a, **k):
        if measured:
            raise RuntimeError("simulated crash")  # during the second model's evaluation
        measured.append(1)
        return measure(*a, **k)

    monkeypatch.setattr(experiment, "measure", stop_after_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(args, monkeypatch)
    monkeypatch.setattr(experiment, "measure", measure)
    trained = []
    real_train = experiment.train
    monkeypatch.setattr(experiment, "train", lambda config, **k: trained.append((config.seed, k["resume"])) or real_train(config, **k))
    assert run_cli([*args, "--resume"], monkeypatch) == 0
    assert trained == [(1, True)]  # seed 0 was recorded; seed 1's finished training is reused, not redone
    assert set(json.loads((out / "pos_embedding.json").read_text())["runs"]) == {"asg/seed0", "asg/seed1"}


def test_the_experiment_needs_a_vit(tmp_path, monkeypatch, capsys):
    assert run_cli(["experiment", "pos-embedding", "--data", DATA, "--out", str(tmp_path / "x"),
                    "--set", "model.name=unet", "--set", "model.options={}", "--steps", "1"], monkeypatch) == 2
    assert "expected model.name: vit_segmenter" in capsys.readouterr().err
