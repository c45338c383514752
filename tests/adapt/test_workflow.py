"""`trustseg adapt` end to end on a tiny U-Net and folder dataset: the source and TENT passes against
hand-run oracles, several methods and refinement in one run, resume, and the user errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

import trustseg.workflows.adapt as adapt_workflow
import trustseg.workflows.robustness as robustness_workflow
from trustseg.engine.inference import Predictor
from trustseg.robustness.corruptions import corrupt
from trustseg.robustness.dataset import condition_seed

from cli_helpers import banded_folder, run_cli, save_tiny_unet

H, W = 40, 48  # multiples of the U-Net's size divisor: no padding enters the batch statistics
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture()
def dataset_root(tmp_path):
    return banded_folder(tmp_path / "data", 3, H, W, boundaries=(W // 3, 2 * W // 3))


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    return path, save_tiny_unet(path)


def images_and_masks(root, corruption=None, severity=None):
    for i in range(3):
        image = torch.from_numpy(np.array(Image.open(root / "images" / f"im{i}.png"))).permute(2, 0, 1)[None]
        if corruption is not None:
            image, _ = corrupt(image, corruption, severity, torch.Generator().manual_seed(condition_seed(0, corruption, severity, i)))
        yield (image.float() / 255 - MEAN) / STD, torch.from_numpy(np.asarray(Image.open(root / "masks" / f"im{i}.png")).astype(np.int64))


def batch_statistics(model):
    """A copy of `model` whose BatchNorms use the statistics of the batch they see, and those BatchNorms."""
    import copy

    copied = copy.deepcopy(model)
    norms = [m for m in copied.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.running_mean = norm.running_var = None
    return copied, norms


def oracle_mious(model, root, lr, corruption=None, severity=None):
    """(source mIoU, online TENT mIoU, test-batch normalisation mIoU), by hand: the source in eval mode;
    TENT on a copy whose BatchNorms use batch statistics, Adam on their affine parameters, one step per
    image, predicting before it; the same copy without any step."""
    source, adapted, normalised, targets = [], [], [], []
    tent, norms = batch_statistics(model)
    plain, _ = batch_statistics(model)
    optimizer = torch.optim.Adam([p for n in norms for p in (n.weight, n.bias)], lr=lr)
    for image, mask in images_and_masks(root, corruption, severity):
        with torch.no_grad():
            source.append(model(image)[0].argmax(0))
            normalised.append(plain(image)[0].argmax(0))
        logits = tent(image)
        adapted.append(logits[0].detach().argmax(0))
        probs = logits.softmax(1)
        loss = -(probs * logits.log_softmax(1)).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        targets.append(mask)
    miou = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=255)
    return tuple(miou(torch.stack(p), torch.stack(targets)).item() for p in (source, adapted, normalised))


def adapt_args(path, root, out, *extra):
    return ["adapt", "--checkpoint", str(path), "--data", f"folder:{root}", "--out", str(out), "--no-progress",
            "--device", "cpu", "--corruptions", "gaussian_noise", "--severities", "2", *extra]


def test_adapt_matches_hand_run_source_tent_and_norm(tmp_path, dataset_root, checkpoint, monkeypatch, one_thread):
    path, model = checkpoint
    out = tmp_path / "run"
    assert run_cli(adapt_args(path, dataset_root, out, "--lr", "0.01", "--method", "tent,norm"), monkeypatch) == 0
    results = json.loads((out / "adapt.json").read_text())
    for key, corruption in (("clean", (None, None)), ("gaussian_noise/2", ("gaussian_noise", 2))):
        source, adapted, normalised = oracle_mious(model, dataset_root, 0.01, *corruption)
        assert source != pytest.approx(adapted, abs=1e-3)  # adaptation made a difference worth checking
        assert results["conditions"][key]["norm"]["mIoU"] == pytest.approx(normalised, abs=1e-6)
        assert results["conditions"][key]["norm"]["adaptation"]["updates"] == 0
        # the steps beyond the statistics show in the confidences even where the decisions barely move
        assert results["conditions"][key]["norm"]["ECE"] != pytest.approx(results["conditions"][key]["tent"]["ECE"], abs=1e-5)
        assert results["conditions"][key]["source"]["mIoU"] == pytest.approx(source, abs=1e-6)
        assert results["conditions"][key]["tent"]["mIoU"] == pytest.approx(adapted, abs=1e-6)
        assert 0 <= results["conditions"][key]["tent"]["ECE"] <= 1
        assert results["conditions"][key]["tent"]["adaptation"]["updates"] == 3  # one per image, from the source
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mIoU_gain_tent"] == pytest.approx(metrics["tent_mean_mIoU"] - metrics["source_mean_mIoU"])
    for name in ("report.md", "report.html", "config.yaml"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "## Test-time adaptation" in report and "## Per condition" in report and "gaussian_noise/2" in report


def test_the_batchnorm_prior_reaches_the_model(tmp_path, dataset_root, checkpoint, monkeypatch, one_thread):
    """norm with a prior of a million images normalises as the source model does; the setup records it."""
    path, _ = checkpoint
    out = tmp_path / "run"
    assert run_cli(adapt_args(path, dataset_root, out, "--method", "norm", "--bn-prior", "1e6"), monkeypatch) == 0
    results = json.loads((out / "adapt.json").read_text())
    assert results["setup"]["adaptations"][0]["bn_prior"] == 1e6
    assert "mixed with the source's counted as 1e+06 images" in (out / "report.md").read_text()
    for passes in results["conditions"].values():
        assert passes["norm"]["mIoU"] == pytest.approx(passes["source"]["mIoU"], abs=1e-6)
        assert passes["norm"]["ECE"] == pytest.approx(passes["source"]["ECE"], abs=1e-4)


@pytest.mark.parametrize("method,mode,bf16", [("reliable", "episodic", False), ("uncertain", "online", True)])
def test_variants_run_end_to_end(tmp_path, dataset_root, checkpoint, monkeypatch, method, mode, bf16, one_thread):
    path, _ = checkpoint
    out = tmp_path / "run"
    args = adapt_args(path, dataset_root, out, "--method", method, "--mode", mode, "--lr", "0.01", "--weighting", "eata",
                      "--severities", "3", *(("--bf16",) if bf16 else ()))
    assert run_cli(args, monkeypatch) == 0
    results = json.loads((out / "adapt.json").read_text())
    assert results["setup"]["inference"]["bf16"] is bf16
    assert set(results["conditions"]) == {"clean", "gaussian_noise/3"}
    assert [a["method"] for a in results["setup"]["adaptations"]] == [method] and results["passes"] == ["source", method]
    for passes in results["conditions"].values():
        summary = passes[method]["adaptation"]
        assert summary["batches"] == 3 and summary["updates"] + summary["skipped_batches"] == 3
        assert 0 <= passes[method]["mIoU"] <= 1


def test_several_methods_and_refinement_in_one_run_match_their_own_runs(tmp_path, dataset_root, checkpoint,
                                                                       monkeypatch, one_thread):
    """Each pass of a run comparing methods (and refinement) equals the run of that method alone, and the
    refined pass equals `trustseg eval --refine` on the clean images."""
    path, _ = checkpoint
    both, alone, refined = tmp_path / "both", tmp_path / "alone", tmp_path / "eval"
    common = ("--lr", "0.01", "--mode", "episodic")
    assert run_cli(adapt_args(path, dataset_root, both, "--method", "tent,uncertain", "--refine", "--refine-q", "50",
                              *common), monkeypatch) == 0
    assert run_cli(adapt_args(path, dataset_root, alone, "--method", "uncertain", *common), monkeypatch) == 0
    assert run_cli(["eval", "--checkpoint", str(path), "--data", f"folder:{dataset_root}", "--out", str(refined),
                    "--refine", "--refine-q", "50", "--no-progress", "--device", "cpu"], monkeypatch) == 0
    results, single = (json.loads((d / "adapt.json").read_text()) for d in (both, alone))
    assert results["passes"] == ["source", "tent", "uncertain", "refined"]
    for key in ("clean", "gaussian_noise/2"):
        for which in ("source", "uncertain"):
            assert results["conditions"][key][which]["mIoU"] == single["conditions"][key][which]["mIoU"]
        assert results["conditions"][key]["refined"]["refine_ms_per_image"] > 0
        assert "adaptation" not in results["conditions"][key]["refined"]
    evaluated = json.loads((refined / "metrics.json").read_text())
    assert results["conditions"]["clean"]["refined"]["mIoU"] == pytest.approx(evaluated["mIoU"], abs=1e-9)
    summary = results["summary"]
    assert set(summary["mIoU_gain"]) == {"tent", "uncertain", "refined"} and set(summary["resets"]) == {"tent", "uncertain"}
    assert set(summary["refined"]["per_family_mIoU"]) == {"noise"} == set(summary["refined"]["per_family_ECE"])
    report = (both / "report.md").read_text()
    assert "## Per corruption family" in report and "propagation steps" in report


def test_resume_skips_finished_passes_and_gives_the_uninterrupted_results(tmp_path, dataset_root, checkpoint,
                                                                         monkeypatch, capsys, one_thread):
    path, _ = checkpoint
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert run_cli(adapt_args(path, dataset_root, whole), monkeypatch) == 0
    real_evaluate, calls = robustness_workflow.evaluate, []

    def crash_on_third(*args, **kwargs):
        calls.append(kwargs["description"].split(" ")[0])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(robustness_workflow, "evaluate", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(adapt_args(path, dataset_root, out), monkeypatch)
    units = [json.loads(line)["unit"] for line in (out / "progress.jsonl").read_text().splitlines()[1:]]
    assert units == ["source@clean", "tent@clean"]
    calls.clear()
    monkeypatch.setattr(robustness_workflow, "evaluate", lambda *a, **k: calls.append(k["description"].split(" ")[0]) or real_evaluate(*a, **k))
    capsys.readouterr()
    assert run_cli(adapt_args(path, dataset_root, out), monkeypatch) == 2  # no overwrite without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert run_cli([*adapt_args(path, dataset_root, out), "--resume"], monkeypatch) == 0
    assert calls == ["source@gaussian_noise/2", "tent@gaussian_noise/2"]
    assert "2 of 4 passes already done and skipped" in capsys.readouterr().err
    resumed, uninterrupted = (json.loads((d / "adapt.json").read_text()) for d in (out, whole))
    assert resumed["conditions"] == uninterrupted["conditions"]


@pytest.mark.parametrize("extra,message", [
    (("--corruptions", "acid_rain"), "unknown corruption 'acid_rain'"),
    (("--method", "magic"), "adaptation method 'magic'"),
    (("--method", "tent,tent"), "--method tent,tent: expected one or more distinct methods"),
    (("--refine-q", "0"), "--refine-q 0"),
    (("--mode", "sometimes"), "adaptation mode 'sometimes'"),
    (("--bn-prior", "-1"), "BatchNorm prior -1.0"),
])
def test_bad_options_are_one_line_errors(tmp_path, dataset_root, checkpoint, monkeypatch, capsys, extra, message):
    path, _ = checkpoint
    out = tmp_path / "run"
    assert run_cli([*adapt_args(path, dataset_root, out), *extra], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_model_without_normalisation_layers_is_refused_before_the_run(tmp_path, dataset_root, checkpoint, monkeypatch, capsys):
    path, _ = checkpoint
    out = tmp_path / "run"
    plain = Predictor(torch.nn.Conv2d(3, 3, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    monkeypatch.setattr(adapt_workflow, "predictor_from_checkpoint", lambda *a, **k: plain)
    assert run_cli(adapt_args(path, dataset_root, out), monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert "has no normalisation layer" in err and str(path) in err and len(err.splitlines()) == 1
    assert not out.exists()
