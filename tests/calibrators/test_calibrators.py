"""Calibrators: declared properties equal measured ones, fits recover known miscalibration."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trustseg.calibrators import METHODS, build_calibrator, fit_calibrator
from trustseg.calibrators.methods import ClassConditionalAffine, MatrixScaling
from trustseg.calibrators.fit_data import FitData, collect_fit_data
from trustseg.calibrators.properties import PROPERTIES, measure_properties, property_table
from trustseg.errors import UserError

from cli_helpers import THREE_CLASSES

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only adds barriers


@pytest.mark.parametrize("method", list(METHODS))
def test_declared_properties_are_the_measured_ones(method):
    calibrator = build_calibrator(method, 6)
    assert {p: bool(getattr(calibrator, p)) for p in PROPERTIES} == measure_properties(method)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_fresh_calibrator_is_the_identity(method):
    logits = 3 * torch.randn(2, 5, 7, 9, generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 7, 9) * 255
    with torch.no_grad():
        out = build_calibrator(method, 5)(logits, images)
    assert torch.allclose(out.softmax(1), logits.softmax(1), atol=1e-3)


def test_the_property_check_catches_a_broken_claim(monkeypatch):
    # vector scaling with all weights equal and no bias is TS: random parameters must expose it as not TI
    assert not measure_properties("vs")["translation_invariant"]
    assert measure_properties("vs_ti")["translation_invariant"]


def test_readme_table_is_generated_from_the_check():
    text = README.read_text()
    start = text.index("<!-- calibration-properties:start -->\n") + len("<!-- calibration-properties:start -->\n")
    end = text.index("\n<!-- calibration-properties:end -->")
    assert text[start:end] == property_table()


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="unknown calibration method 'platt'"):
        build_calibrator("platt", 3)


def tempered_rows(temperature, n=60_000, K=5, seed=0):
    """Logits z whose labels are drawn from softmax(z / temperature): TS's optimum is that temperature."""
    g = torch.Generator().manual_seed(seed)
    z = 4 * torch.randn(n, K, generator=g)
    labels = torch.multinomial((z / temperature).softmax(1), 1, generator=g)[:, 0]
    return FitData(z, labels, images=1, labelled_pixels=n)


def fitted(method, data, **kwargs):
    calibrator = build_calibrator(method, data.logits.shape[1])
    report = fit_calibrator(calibrator, data, **kwargs)
    return calibrator, report


def test_temperature_scaling_recovers_the_true_temperature():
    calibrator, report = fitted("ts", tempered_rows(2.5))
    assert calibrator.summary()["temperature"] == pytest.approx(2.5, rel=0.04)
    assert report.nll_after < report.nll_before


def test_richer_families_fit_at_least_as_well_as_the_temperature_they_contain():
    # each of these families contains TS, so its optimum NLL cannot be worse (up to the ODIR penalty)
    data = tempered_rows(2.0, n=30_000)
    ts = fitted("ts", data)[1].nll_after
    for method in ("vs", "vs_ti", "ms", "ms_ti", "dirichlet", "ccaffine", "ccaffine_argmax"):
        assert fitted(method, data)[1].nll_after <= ts + 2e-3, method


def test_vector_scaling_removes_a_class_bias_that_temperature_cannot():
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(40_000, 4, generator=g)
    labels = torch.multinomial((z + torch.tensor([1.5, 0, 0, -1.0])).softmax(1), 1, generator=g)[:, 0]
    data = FitData(z, labels, images=1, labelled_pixels=40_000)
    assert fitted("vs", data)[1].nll_after < fitted("ts", data)[1].nll_after - 0.02


def test_odir_penalises_off_diagonal_weights_and_intercepts_only():
    calibrator = MatrixScaling(3, odir=0.5)
    with torch.no_grad():
        calibrator.weight.copy_(torch.tensor([[5.0, 1.0, 0.0], [0.0, 7.0, 2.0], [0.0, 0.0, 9.0]]))
        calibrator.bias.copy_(torch.tensor([1.0, 0.0, -2.0]))
    expected = 0.5 * ((1 + 4) / (3 * 2) + (1 + 4) / 3)
    assert float(calibrator.regularization().detach()) == pytest.approx(expected)


def test_class_conditional_affine_is_a_per_predicted_class_temperature_and_bonus():
    calibrator = ClassConditionalAffine(3).double()
    with torch.no_grad():
        calibrator.log_scale.copy_(torch.log(torch.tensor([[0.5], [2.0], [1.0]], dtype=torch.float64)))
        calibrator.raw_bonus.copy_(torch.tensor([[0.3], [1.2], [-1.0]], dtype=torch.float64))
    z = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    for row, k in zip(z, (0, 1)):
        scale, bonus = (0.5, 2.0)[k], F.softplus(torch.tensor((0.3, 1.2)[k], dtype=torch.float64))
        expected = (scale * row + bonus * F.one_hot(torch.tensor(k), 3)).softmax(0)
        assert torch.allclose(calibrator.transform(row[None])[0].softmax(0), expected)


def test_local_temperature_scaling_beats_one_temperature_when_confidence_varies_in_space():
    # left half of each map is 4x overconfident, right half calibrated: one T cannot fit both
    g = torch.Generator().manual_seed(0)
    maps = []
    for _ in range(4):
        z = 3 * torch.randn(3, 16, 16, generator=g)
        truth = z.clone()
        truth[:, :, :8] /= 4
        mask = torch.multinomial(truth.permute(1, 2, 0).reshape(-1, 3).softmax(1), 1, generator=g).view(16, 16)
        maps.append((z, torch.zeros(3, 16, 16), mask))
    rows = FitData(torch.cat([m[0].permute(1, 2, 0).reshape(-1, 3) for m in maps]),
                   torch.cat([m[2].flatten() for m in maps]), maps, images=4, labelled_pixels=1024)
    lts = fitted("lts", rows, epochs=50, lr=0.03)[1].nll_after
    ts = fitted("ts", rows)[1].nll_after
    assert lts < ts - 0.1


def test_spatial_methods_need_maps():
    data = tempered_rows(1.0, n=100)
    with pytest.raises(UserError, match="logit-map crops"):
        fitted("lts", data)


def test_fits_are_deterministic():
    data = tempered_rows(1.5, n=5_000)
    first, second = fitted("ms", data)[0], fitted("ms", data)[0]
    assert torch.equal(first.weight, second.weight) and math.isfinite(float(first.weight.sum()))


class TinyLabelled:
    """Two 4x5 images with labels; the second is all ignore_index when `blank` is set."""

    classes = THREE_CLASSES

    def __init__(self, blank=False):
        self.blank = blank

    def __len__(self):
        return 2

    def __getitem__(self, i):
        mask = torch.full((4, 5), 255 if self.blank else i, dtype=torch.int64)
        return {"image": torch.zeros(3, 4, 5, dtype=torch.uint8), "mask": mask, "path": f"im{i}.png"}


def test_fit_data_keeps_a_bounded_sample():
    data = collect_fit_data(lambda images: torch.randn(images.shape[0], 3, 4, 5), TinyLabelled(), max_pixels=6,
                            max_crops=1, progress=False)
    assert data.logits.shape == (6, 3) and data.labelled_pixels == 40 and len(data.maps) == 1
    assert set(data.labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("predictor, dataset, message", [
    (lambda images: torch.full((1, 3, 4, 5), float("nan")), TinyLabelled(), "contain NaN or inf"),
    (lambda images: torch.zeros(1, 3, 4, 5), TinyLabelled(blank=True), "no labelled pixels"),
    (lambda images: torch.zeros(1, 3, 4, 5), [], "the fit data is empty"),
])
def test_bad_fit_data_is_a_user_error(predictor, dataset, message):
    with pytest.raises(UserError, match=message):
        collect_fit_data(predictor, dataset, progress=False)
