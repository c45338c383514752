"""U-Net: shapes, the size contract, gradients, modes, parameter count by hand, learning a toy task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trustseg.errors import UserError
from trustseg.models.shapes import check_input_size
from trustseg.models.unet import UNet, unet


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**options) -> UNet:
    torch.manual_seed(0)
    return unet(num_classes=options.pop("num_classes", 5), base_width=options.pop("base_width", 4), **options)


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
@pytest.mark.parametrize(("depth", "size"), [(1, (2, 6)), (2, (8, 12)), (3, (32, 40)), (4, (48, 64))])
def test_output_is_logits_at_input_size(norm, upsample, depth, size):
    model = small(depth=depth, norm=norm, upsample=upsample).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, 5, *size)
    assert torch.isfinite(logits).all()
    assert model.size_divisor == 2**depth


@pytest.mark.parametrize(("size", "padded"), [((60, 64), "64x64"), ((64, 17), "64x32"), ((1, 1), "16x16")])
def test_indivisible_size_names_the_padded_size(size, padded):
    model = small(depth=4)
    with pytest.raises(ValueError, match=f"divisible by 16, got {size[0]}x{size[1]}; pad the input to {padded}"):
        model(torch.randn(1, 3, *size))


def test_check_input_size_accepts_multiples():
    check_input_size(96, 32, 32, model="m")
    with pytest.raises(ValueError, match="pad the input to 128x32"):
        check_input_size(97, 32, 32, model="m")


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_every_parameter_gets_a_gradient(upsample):
    model = small(depth=3, upsample=upsample, norm="group").train()
    images = torch.randn(2, 3, 16, 16)
    target = torch.randint(0, 5, (2, 16, 16))
    F.cross_entropy(model(images), target).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_train_mode_updates_batch_norm_statistics_and_eval_mode_does_not():
    model = small(depth=2)
    images = torch.randn(4, 3, 16, 16) * 3 + 1
    stem_bn = model.stem[1]
    model.train()
    model(images)
    after_train = stem_bn.running_mean.clone()
    assert not torch.equal(after_train, torch.zeros_like(after_train))
    model.eval()
    with torch.no_grad():
        first = model(images[:1])
        second = model(images[:1])
    assert torch.equal(stem_bn.running_mean, after_train)
    assert torch.equal(first, second)
    # Eval mode normalises each sample with running statistics: a sample's logits do not depend on its batch.
    with torch.no_grad():
        torch.testing.assert_close(model(images)[:1], first, atol=1e-5, rtol=1e-5)


def _double_conv_params(c_in: int, c_out: int) -> int:
    # two bias-free 3x3 convs, each followed by a norm with weight and bias
    return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out


@pytest.mark.parametrize("upsample", ["bilinear", "transpose"])
def test_parameter_count_matches_the_architecture_by_hand(upsample):
    k, c_in, w, depth = 7, 3, 8, 3
    widths = [w * 2**i for i in range(depth + 1)]
    expected = _double_conv_params(c_in, widths[0])
    expected += sum(_double_conv_params(widths[i], widths[i + 1]) for i in range(depth))
    for i in range(depth):  # decoder level i: channel reduction (1x1 conv or 2x2 transposed conv), then convs
        kernel = 1 if upsample == "bilinear" else 4
        expected += kernel * widths[i + 1] * widths[i] + widths[i]
        expected += _double_conv_params(2 * widths[i], widths[i])
    expected += widths[0] * k + k
    model = unet(num_classes=k, in_channels=c_in, base_width=w, depth=depth, upsample=upsample)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_channels_last_and_bf16_autocast():
    model = small(depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        channels_last = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    torch.testing.assert_close(channels_last, reference, atol=1e-4, rtol=1e-4)
    assert low.dtype == torch.bfloat16 and low.shape == reference.shape
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)


def _brighter_than_neighbours(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(8, 3, 16, 16, generator=generator)
    gray = images.mean(1, keepdim=True)
    return images, (gray > F.avg_pool2d(gray, 3, stride=1, padding=1, count_include_pad=False)).long()[:, 0]


def test_learns_a_local_rule_that_needs_the_full_resolution_path():
    # Label: is a pixel brighter than its 3x3 neighbourhood mean. Only the stride-1 skip can resolve it;
    # held-out images check that the rule was learnt, not the pixels (chance is about 50%).
    generator = torch.Generator().manual_seed(0)
    images, target = _brighter_than_neighbours(generator)
    held_out, held_out_target = _brighter_than_neighbours(generator)
    model = small(num_classes=2, base_width=8, depth=2).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        optimiser.zero_grad()
        loss = F.cross_entropy(model(images), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        accuracy = (model(held_out).argmax(1) == held_out_target).float().mean()
    assert accuracy > 0.7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "layer"}, "norm must be 'batch' or 'group'"),
        ({"upsample": "nearest"}, "upsample must be 'bilinear' or 'transpose'"),
        ({"depth": 0}, "must be >= 1"),
        ({"num_classes": 0}, "must be >= 1"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        unet(**{"num_classes": 3, **options})


def test_builder_is_keyword_only_and_forwards_options():
    with pytest.raises(TypeError):
        unet(3)  # type: ignore[misc]
    model = unet(num_classes=4, base_width=8, depth=2, norm="group", upsample="transpose", in_channels=1)
    assert isinstance(model.stem[1], torch.nn.GroupNorm)
    assert isinstance(model.up[0].reduce, torch.nn.ConvTranspose2d)
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 4, 8, 8)
