"""Calibration under shift: fit images drawn under mixed corruptions (Tomani et al., CVPR 2021), only the
fit data read to fit, unseen evaluation corruptions, the best decision-preserving method per condition."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trustseg.workflows.calibration as calibration_workflow
from trustseg.robustness.corruptions import corrupt
from trustseg.robustness.dataset import MixedCorruptionDataset, condition_seed, mixed_condition
from trustseg.errors import UserError
from trustseg.workflows.calibration_shift import best_decision_preserving, lofo_plan

from cli_helpers import THREE_CLASSES, banded_folder, run_cli, save_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 32, 40
FIT = ("fog", "contrast", "shot_noise")


class Images:
    """Six random 32x36 images with masks, read straight from tensors."""

    classes = THREE_CLASSES

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (6, 3, 32, 36), generator=g, dtype=torch.uint8)
        self.masks = torch.randint(0, 3, (6, 32, 36), generator=g)

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index):
        return {"image": self.images[index], "mask": self.masks[index], "path": f"im{index}"}


def test_fit_conditions_are_drawn_from_the_seed_alone_clean_included():
    draws = [mixed_condition(i, FIT, (1, 2, 3, 4, 5), seed=0) for i in range(300)]
    assert draws == [mixed_condition(i, FIT, (1, 2, 3, 4, 5), seed=0) for i in range(300)]
    assert draws != [mixed_condition(i, FIT, (1, 2, 3, 4, 5), seed=1) for i in range(300)]
    allowed = {"clean", *(f"{n}/{s}" for n in FIT for s in range(1, 6))}
    assert set(draws) == allowed  # every condition occurs, and no other
    # six equally likely levels: clean is about 1/6 of the draws (binomial, 300 draws: within 4.5 sd)
    assert abs(draws.count("clean") - 50) < 4.5 * math.sqrt(300 * (1 / 6) * (5 / 6))


def test_a_fit_image_is_corrupted_exactly_as_its_condition_says():
    data = Images()
    view = MixedCorruptionDataset(data, FIT, (2, 4), seed=3)
    conditions = [view.condition(i) for i in range(6)]
    assert len(set(conditions)) > 1
    for i, key in enumerate(conditions):
        sample = view[i]
        if key == "clean":
            assert torch.equal(sample["image"], data.images[i])
            continue
        name, severity = key.split("/")
        generator = torch.Generator().manual_seed(condition_seed(3, name, int(severity), i))
        expected, _ = corrupt(data.images[i][None], name, int(severity), generator)
        assert torch.equal(sample["image"], expected[0]) and not torch.equal(sample["image"], data.images[i])
        assert sample["path"] == f"im{i}"


def constructed(ece, preserving):
    methods = {name: {"properties": {"argmax_preserving": keeps}} for name, keeps in preserving.items()}
    return methods, {name: {"ECE": value} for name, value in ece.items()}


@pytest.mark.parametrize("ece, preserving, expected", [
    # the lowest ECE changes decisions: the best that keeps them wins
    ({"uncalibrated": 0.2, "ts": 0.1, "vs": 0.05, "lts": 0.12}, {"ts": True, "vs": False, "lts": True}, "ts"),
    # no calibrator beats the model itself
    ({"uncalibrated": 0.03, "ts": 0.1, "dirichlet": 0.01}, {"ts": True, "dirichlet": False}, "uncalibrated"),
    # NaN never wins
    ({"uncalibrated": 0.2, "ts": math.nan, "ccaffine": 0.15}, {"ts": True, "ccaffine": True}, "ccaffine"),
])
def test_best_decision_preserving_method(ece, preserving, expected):
    best = best_decision_preserving(*constructed(ece, preserving))
    assert best["method"] == expected and best["uncalibrated_ECE"] == ece["uncalibrated"]
    assert all(name == "uncalibrated" or preserving[name] for name in best["candidates"])


@pytest.fixture()
def setup(tmp_path):
    root = banded_folder(tmp_path / "data", 6, H, W)
    save_tiny_unet(tmp_path / "model.pt")
    return root, tmp_path / "model.pt"


def calibrate_args(model, root, out, *extra):
    return ["calibrate", "--checkpoint", str(model), "--fit-data", f"folder:{root}#images=0:3",
            "--data", f"folder:{root}#images=3:", "--out", str(out), "--method", "ts,vs", "--save", "none",
            "--no-progress", *extra]


def test_corruption_fitted_calibration_reads_only_the_fit_data(setup, tmp_path, monkeypatch):
    root, model = setup
    seen = []
    real = calibration_workflow.collect_fit_data

    class Spy:
        def __init__(self, dataset):
            self.dataset, self.classes = dataset, dataset.classes

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            sample = self.dataset[index]
            seen.append((index, sample["path"], sample["image"].clone()))
            return sample

    monkeypatch.setattr(calibration_workflow, "collect_fit_data",
                        lambda predictor, dataset, **options: real(predictor, Spy(dataset), **options))
    out = tmp_path / "shift"
    args = calibrate_args(model, root, out, "--fit-corruptions", ",".join(FIT), "--fit-severities", "1-5",
                          "--corruptions", "gaussian_blur", "--severities", "3", "--seed", "2")
    expected = {i: mixed_condition(i, FIT, (1, 2, 3, 4, 5), seed=2) for i in range(3)}
    assert sorted(set(expected.values())) == ["clean", "fog/5", "shot_noise/5"]  # both kinds of fit image
    assert run_cli(args, monkeypatch) == 0
    fit_images = {str((root / "images" / f"im{i}.png").resolve()) for i in range(3)}
    assert sorted(index for index, _, _ in seen) == [0, 1, 2]
    assert {str(Path(path).resolve()) for _, path, _ in seen} == fit_images
    results = json.loads((out / "calibration.json").read_text())
    drawn = results["setup"]["fit_conditions"]
    assert sum(drawn.values()) == 3 and drawn == {k: list(expected.values()).count(k) for k in drawn}
    for index, path, image in seen:  # the fit saw each image under its drawn condition, not clean
        clean = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
        assert torch.equal(image, clean) == (expected[index] == "clean")
    assert results["setup"]["fit_corruptions"] == list(FIT)
    for key in ("clean", "gaussian_blur/3"):
        best = results["best_decision_preserving"][key]
        assert best["method"] in ("ts", "uncalibrated") and best == best_decision_preserving(
            results["methods"], results["conditions"][key])
    report = (out / "report.md").read_text()
    assert "Best decision-preserving method per condition" in report and "unseen in fitting" in report


def test_evaluation_corruptions_seen_in_fitting_are_refused_unless_allowed(setup, tmp_path, monkeypatch, capsys):
    root, model = setup
    args = calibrate_args(model, root, tmp_path / "o", "--fit-corruptions", "fog,contrast", "--corruptions", "weather",
                          "--severities", "2")
    assert run_cli(args, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "share fog" in err and "--allow-overlap" in err
    assert run_cli([*args, "--allow-overlap"], monkeypatch) == 0
    assert "may overlap them" in (tmp_path / "o" / "report.md").read_text()


def test_leave_one_family_out_plan():
    plan = lofo_plan(("gaussian_noise", "fog", "contrast", "snow"), ("contrast", "fog", "shot_noise"), (2, 4))
    assert list(plan) == ["noise", "weather", "digital"]
    assert plan["noise"] == {"fit_corruptions": ["fog", "contrast", "snow"],
                             "conditions": ["shot_noise/2", "shot_noise/4"]}
    assert plan["weather"]["fit_corruptions"] == ["gaussian_noise", "contrast"]
    assert plan["digital"] == {"fit_corruptions": ["gaussian_noise", "fog", "snow"],
                               "conditions": ["contrast/2", "contrast/4"]}
    with pytest.raises(UserError, match="every --fit-corruptions is a weather corruption"):
        lofo_plan(("fog", "snow"), ("fog", "contrast"), (3,))
    with pytest.raises(UserError, match="needs --fit-corruptions and --corruptions"):
        lofo_plan((), ("fog",), (3,))


def test_leave_one_family_out_fits_without_the_held_out_family(setup, tmp_path, monkeypatch):
    root, model = setup
    fits = []
    real = calibration_workflow.collect_fit_data

    def spy(predictor, dataset, **options):
        source = dataset.dataset if hasattr(dataset, "indices") else dataset
        fits.append(getattr(source, "corruptions", ()))
        return real(predictor, dataset, **options)

    monkeypatch.setattr(calibration_workflow, "collect_fit_data", spy)
    out = tmp_path / "lofo"
    args = calibrate_args(model, root, out, "--fit-corruptions", ",".join(FIT), "--corruptions", "gaussian_noise,fog",
                          "--severities", "2", "--leave-one-family-out", "--seed", "2")
    assert run_cli(args, monkeypatch) == 0  # the fit and evaluation corruptions overlap: allowed family-wise
    assert fits == [(), ("fog", "contrast"), ("contrast", "shot_noise")]  # clean reference, then w/o noise, w/o weather
    results = json.loads((out / "calibration.json").read_text())
    assert results["setup"]["fit_corruptions"] == [] and results["setup"]["fit_conditions"] == {"clean": 3}
    held = results["leave_one_family_out"]
    assert list(held) == ["noise", "weather"]
    assert list(held["noise"]["conditions"]) == ["gaussian_noise/2"] and list(held["weather"]["conditions"]) == ["fog/2"]
    for family, entry in held.items():
        for key, methods in entry["conditions"].items():
            # same model, same corrupted images: the uncalibrated row is the main run's
            assert methods["uncalibrated"] == results["conditions"][key]["uncalibrated"]
            assert entry["best_decision_preserving"][key] == best_decision_preserving(entry["methods"], methods)
    assert "Leave one corruption family out" in (out / "report.md").read_text()
