"""`trustseg compress` end to end on a tiny ViT trained on synthetic scenes."""

import json

import pytest

from trustseg.compress.reducers import find_vit
from trustseg.compress.tome import ToMeReducer
from trustseg.engine.checkpoint import load_checkpoint
from trustseg.engine.inference import model_from_checkpoint
from trustseg.training import config_from_dict
from trustseg.training.loop import train

from cli_helpers import run_cli, save_tiny_unet

DATA = "synthetic#size=64,num_images=3"
FAST = ["--corruptions", "gaussian_noise", "--severities", "1", "--max-images", "2", "--latency-runs", "1",
        "--no-progress"]


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    """A depth-2 ViT-Ti/16 segmenter trained 4 steps by `train` (so it carries its recipe)."""
    out = tmp_path_factory.mktemp("compress") / "vit"
    config = config_from_dict({
        "out": str(out), "seed": 0, "batch_size": 2, "steps": 4, "device": "cpu",
        "data": {"train": "synthetic#size=64,num_images=4", "val": "synthetic#split=val,size=64,num_images=2",
                 "crop": [64, 64], "val_batch_size": 2},
        "model": {"name": "vit_segmenter", "options": {"backbone": "vit_ti16", "depth": 2}},
        "optim": {"lr": 0.001},
    })
    return train(config, progress=False).run_dir / "last.pt"


def compress(args, monkeypatch, code=0):
    assert run_cli(["compress", *args], monkeypatch) == code


def test_each_method_is_measured_saved_and_evaluates_the_same_through_eval(vit_checkpoint, tmp_path, monkeypatch,
                                                                             one_thread):
    out = tmp_path / "run"
    methods = ["tome:r=3", "prune:flops=0.6,importance=magnitude", "prune:flops=0.7,importance=magnitude+tome:r=2"]
    compress(["--checkpoint", str(vit_checkpoint), "--data", DATA, "--out", str(out),
              *[a for m in methods for a in ("--method", m)], *FAST], monkeypatch)
    results = json.loads((out / "compression.json").read_text())
    assert set(results["methods"]) == set(methods)
    base = results["uncompressed"]
    assert base["gflops_ratio"] == 1.0 and base["params_ratio"] == 1.0 and base["speedup"] == 1.0
    assert base["cost_size"] == [64, 64]
    for name, entry in results["methods"].items():
        assert 0 < entry["gflops_ratio"] < 1, name
        assert set(entry["conditions"]) == {"clean", "gaussian_noise/1"}
        assert entry["latency_ms"] > 0 and entry["speedup"] == pytest.approx(1 / entry["relative_latency"])
    pruned = results["methods"]["prune:flops=0.6,importance=magnitude"]
    assert abs(pruned["gflops_ratio"] - 0.6) <= 0.03  # the target, counted at the cost size
    assert pruned["params_ratio"] < 1
    assert results["methods"]["tome:r=3"]["params_ratio"] == 1.0  # merging removes tokens, not weights
    for plot in ("frontier_clean_gflops.png", "frontier_corrupted_relative_latency.png"):
        assert (out / plot).stat().st_size > 0
    assert "Accuracy–cost frontier" in (out / "report.md").read_text()
    # `trustseg report` rebuilds the same page from the run directory alone
    assert run_cli(["report", str(out), "--out", str(tmp_path / "page")], monkeypatch) == 0
    assert "Accuracy–cost frontier" in next((tmp_path / "page").rglob("*.md")).read_text()

    # the saved checkpoint of prune-then-merge is the pruned model with ToMe installed, and `eval` on it
    # measures what compress measured
    saved = results["methods"]["prune:flops=0.7,importance=magnitude+tome:r=2"]["checkpoint"]
    checkpoint = load_checkpoint(out / saved)
    assert checkpoint.model["token_reduction"] == "tome:r=2"
    model = model_from_checkpoint(checkpoint)
    assert all(isinstance(block.token_reducer, ToMeReducer) for block in find_vit(model).blocks)
    assert find_vit(model).config.block_heads is not None
    assert run_cli(["eval", "--checkpoint", str(out / saved), "--data", DATA, "--max-images", "2", "--out",
                    str(tmp_path / "eval"), "--no-progress", "--no-boundary-iou", "--uncertainty", "none"],
                   monkeypatch) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["mIoU"]
    assert evaluated == pytest.approx(results["methods"]["prune:flops=0.7,importance=magnitude+tome:r=2"]
                                      ["clean_mIoU"], abs=1e-9)


def test_a_sweep_draws_four_levels_per_family_and_fine_tunes_pruned_models(vit_checkpoint, tmp_path, monkeypatch,
                                                                            one_thread):
    out = tmp_path / "sweep"
    compress(["--checkpoint", str(vit_checkpoint), "--data", DATA, "--out", str(out), "--sweep", "tome",
              "--method", "prune:flops=0.5", "--finetune-steps", "2", "--importance-images", "2", *FAST], monkeypatch)
    results = json.loads((out / "compression.json").read_text())
    families = [entry["family"] for entry in results["methods"].values()]
    assert families.count("tome") == 4
    ratios = [e["gflops_ratio"] for e in results["methods"].values() if e["family"] == "tome"]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] < ratios[0]  # more merging, fewer FLOPs
    tuned = results["methods"]["prune:flops=0.5"]
    assert tuned["finetune"]["steps"] == 2 and tuned["finetune"]["teacher"] == str(vit_checkpoint)
    assert tuned["prune"]["block_heads"]


def test_a_finished_run_resumes_without_redoing_anything(vit_checkpoint, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "resume"
    args = ["--checkpoint", str(vit_checkpoint), "--data", DATA, "--out", str(out), "--method", "tome:r=2",
            "--short-side", "32", "--policy-steps", "3", *FAST]
    compress(args, monkeypatch)
    first = json.loads((out / "compression.json").read_text())
    assert first["uncompressed"]["cost_size"] == [32, 32]  # cost is counted at the size the model sees
    compress([*args, "--method", "algm:tau=0.5", "--method", "cts:k=1", "--resume"], monkeypatch)
    second = json.loads((out / "compression.json").read_text())
    assert second["methods"]["tome:r=2"] == first["methods"]["tome:r=2"]  # read back, not measured again
    assert "algm:tau=0.5" in second["methods"]
    cts = second["methods"]["cts:k=1"]  # a 2 x 2 patch grid has one 2 x 2 window
    assert cts["cts"]["steps"] == 3 and cts["gflops_ratio"] < 1
    checkpoint = load_checkpoint(out / cts["checkpoint"])  # the policy travels in the checkpoint
    assert checkpoint.model["token_reduction"] == "cts:k=1" and checkpoint.token_policy


@pytest.mark.parametrize("args, message", [
    (["--method", "tome:r=100"], "larger than the 16 patch tokens"),
    (["--method", "prune:flops=1.5"], "fraction in (0, 1)"),
    (["--method", "cut:r=2"], "unknown method 'cut'"),
    ([], "at least one --method"),
    (["--sweep", "tome,shrink"], "unknown family 'shrink'"),
])
def test_bad_methods_are_one_line_errors(vit_checkpoint, tmp_path, monkeypatch, capsys, args, message):
    compress(["--checkpoint", str(vit_checkpoint), "--data", DATA, "--out", str(tmp_path / "bad"), *args, *FAST],
             monkeypatch, code=2)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_cnn_checkpoint_is_refused_for_token_merging(tmp_path, monkeypatch, capsys):
    from trustseg.data.synthetic import SyntheticDataset

    path = tmp_path / "unet.pt"
    save_tiny_unet(path, SyntheticDataset("val", num_images=1, size=32).classes)
    compress(["--checkpoint", str(path), "--data", DATA, "--out", str(tmp_path / "cnn"), "--method", "tome:r=2",
              *FAST], monkeypatch, code=2)
    assert "needs a ViT backbone" in capsys.readouterr().err
    assert not (tmp_path / "cnn" / "compression.json").exists()
