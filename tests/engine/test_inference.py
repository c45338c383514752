import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cli_helpers import save_tiny_unet
from trustseg.calibrators.methods import build_calibrator
from trustseg.engine.checkpoint import load_checkpoint, save_checkpoint
from trustseg.engine.inference import (
    InferenceConfig,
    Predictor,
    padded_logits,
    predictor_from_checkpoint,
    sliding_window_logits,
    window_starts,
)
from trustseg.errors import UserError


class PixelwiseModel(nn.Module):
    """A 1x1 conv: its output at a pixel depends only on that pixel, so tiling must not change it."""

    size_divisor = 8

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError("not divisible")
        return self.conv(x)


@given(size=st.integers(1, 300), crop=st.integers(1, 128), stride_fraction=st.floats(0.1, 1.0))
def test_windows_cover_every_position_and_stay_inside(size, crop, stride_fraction):
    stride = max(1, int(crop * stride_fraction))
    starts = window_starts(size, crop, stride)
    covered = torch.zeros(size, dtype=torch.bool)
    for start in starts:
        assert start >= 0 and (start + crop <= size or start == 0)
        covered[start : start + crop] = True
    assert covered.all()
    assert starts == sorted(set(starts))


@settings(deadline=None, max_examples=20)
@given(height=st.integers(5, 70), width=st.integers(5, 70))
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(height, width):
    model = PixelwiseModel()
    images = torch.randn(2, 3, height, width)
    whole = padded_logits(model, images, model.size_divisor)
    slid = sliding_window_logits(model, images, crop=(24, 32), stride=(16, 16), divisor=model.size_divisor)
    assert whole.shape == (2, 4, height, width)
    torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


def test_sliding_window_averages_overlaps():
    constant_per_window = iter(range(100))

    def model(x):  # each call returns a different constant: overlap cells must hold the mean
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(next(constant_per_window)))

    out = sliding_window_logits(model, torch.zeros(1, 3, 4, 6), crop=(4, 4), stride=(4, 2))
    # windows start at columns 0 and 2: columns 2..3 are covered by both (values 0 and 1)
    assert out[0, 0, 0].tolist() == [0, 0, 0.5, 0.5, 1, 1]


def test_predictor_normalises_pads_and_resizes_back():
    model = PixelwiseModel()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randint(0, 256, (1, 3, 21, 30), dtype=torch.uint8)
    expected = model.conv((images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    logits = Predictor(model, mean, std)(images)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    resized = Predictor(model, mean, std, InferenceConfig(short_side=42))(images)
    assert resized.shape == (1, 4, 21, 30)


def test_scale_resizes_after_the_short_side():
    """The model sees the image at scale x its size (x short_side / short side when both are set)."""
    seen = []

    class Spy(PixelwiseModel):
        size_divisor = 1  # no padding: the model sees the resized image as it is

        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    images = torch.randint(0, 256, (1, 3, 20, 30), dtype=torch.uint8)
    for config in (InferenceConfig(scale=2.0), InferenceConfig(short_side=40), InferenceConfig(short_side=10, scale=4.0),
                   InferenceConfig(scale=0.5)):
        assert Predictor(Spy(), (0, 0, 0), (1, 1, 1), config)(images).shape == (1, 4, 20, 30)
    assert seen == [(40, 60), (40, 60), (40, 60), (10, 15)]
    with pytest.raises(UserError, match="scale 0"):
        InferenceConfig(scale=0)


def test_predictor_rejects_bad_shapes_and_configs():
    with pytest.raises(UserError, match="B, 3, H, W"):
        Predictor(PixelwiseModel(), (0, 0, 0), (1, 1, 1))(torch.zeros(3, 8, 8))
    with pytest.raises(UserError, match="crop and stride"):
        InferenceConfig(mode="slide")
    with pytest.raises(UserError, match="inference mode"):
        InferenceConfig(mode="tiles")


def edited_checkpoint(tmp_path, edit):
    """A tiny U-Net checkpoint passed through `edit(checkpoint)`, saved and loaded again."""
    path = tmp_path / "model.pt"
    save_tiny_unet(path)
    checkpoint = load_checkpoint(path)
    edit(checkpoint)
    save_checkpoint(checkpoint, path)
    return path, load_checkpoint(path)


def reshape_classifier(checkpoint):
    checkpoint.state_dict["classifier.weight"] = checkpoint.state_dict["classifier.weight"][:, :2]


@pytest.mark.parametrize(
    "edit, message",
    [
        (reshape_classifier,
         r"1 shape mismatch \(classifier\.weight: checkpoint \(3, 2, 1, 1\) vs model \(3, 4, 1, 1\)\)"),
        # 4 * 2**12 channels at the bottleneck (about 10 GB of weights): refused on the meta device, unallocated
        (lambda c: c.model["options"].update(depth=12), r"missing keys"),
        (lambda c: c.model["options"].update(base_width="4"), r"model 'unet': option base_width='4'; expected an int"),
        # 4 * 2**40 channels: the builder's own failure (here a size overflow) is reported with the options
        (lambda c: c.model["options"].update(depth=40), r"model 'unet' cannot be built with options .*'depth': 40"),
        (lambda c: c.model["options"].update(width=4), r"model 'unet': unknown option"),
        (lambda c: c.model.update(name="resnet"), r"unknown model 'resnet'"),
        (lambda c: setattr(c, "calibrator", {"method": "vs", "state_dict": {"weight": torch.ones(5),
                                                                            "bias": torch.zeros(3)}}),
         r"the vs calibrator of checkpoint .*1 shape mismatch \(weight: checkpoint \(5,\) vs model \(3,\)\)"),
        (lambda c: setattr(c, "calibrator", {"method": "lts", "state_dict": {}}), r"lts calibrator .* missing keys"),
        (lambda c: setattr(c, "calibrator", {"method": "platt", "state_dict": {}}), r"unknown calibration method"),
    ],
)
def test_checkpoints_that_do_not_fit_their_recipe_are_one_line_errors_naming_the_file(tmp_path, edit, message):
    path, checkpoint = edited_checkpoint(tmp_path, edit)
    with pytest.raises(UserError, match=message) as info:
        predictor_from_checkpoint(checkpoint)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_with_a_fitted_calibrator_predicts_calibrated_logits(tmp_path):
    calibrator = build_calibrator("ts", 3)
    calibrator.log_temperature.data.fill_(0.5)
    path, checkpoint = edited_checkpoint(
        tmp_path, lambda c: setattr(c, "calibrator", {"method": "ts", "state_dict": calibrator.state_dict()}))
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    raw = predictor_from_checkpoint(checkpoint, calibrated=False)(images)
    assert torch.allclose(predictor_from_checkpoint(checkpoint)(images), raw * torch.exp(torch.tensor(-0.5)))
