"""Uncertainty measures against explicit NumPy formulas; MC dropout against passes run by hand."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from trustseg.errors import UserError
from trustseg.models.segformer import Block
from trustseg.engine.uncertainty_maps import (
    UNCERTAINTY,
    dropout_enabled,
    dropout_modules,
    entropy,
    margin,
    mc_dropout,
    msp,
)


def random_probs(seed, shape=(2, 5, 6, 7)):
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).softmax(1)
    probs[0, :, 0, 0] = torch.nn.functional.one_hot(torch.tensor(1), shape[1])  # exact zeros
    return probs


@pytest.mark.parametrize("seed", [0, 1])
def test_measures_match_numpy_formulas(seed):
    probs = random_probs(seed)
    p = np.moveaxis(probs.numpy(), 1, -1)  # (B, H, W, K)
    K = p.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        nats = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    ordered = np.sort(p, axis=-1)
    np.testing.assert_allclose(entropy(probs).numpy(), nats / math.log(K), rtol=0, atol=1e-12)
    np.testing.assert_allclose(msp(probs).numpy(), 1 - ordered[..., -1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(margin(probs).numpy(), 1 - (ordered[..., -1] - ordered[..., -2]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("K", [2, 3, 19])
def test_measures_span_zero_for_one_hot_to_their_maximum_for_uniform(K):
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0]]), K).permute(0, 2, 1)[..., None].float()
    uniform = torch.full((1, K, 1, 1), 1 / K)
    for name, measure in UNCERTAINTY.items():
        assert measure(one_hot).item() == 0, name
        assert measure(one_hot).shape == (1, 1, 1)
    assert entropy(uniform).item() == pytest.approx(1, abs=1e-6)
    assert msp(uniform).item() == pytest.approx(1 - 1 / K, abs=1e-6)
    assert margin(uniform).item() == pytest.approx(1, abs=1e-6)


def test_one_class_is_certain():
    probs = torch.ones(2, 1, 3, 4)
    for name, measure in UNCERTAINTY.items():
        assert torch.equal(measure(probs), torch.zeros(2, 3, 4)), name


class DropoutNet(nn.Module):
    """conv -> BatchNorm -> dropout -> conv: MC dropout must use the BatchNorm running statistics."""

    def __init__(self, rate=0.5, K=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout2d(rate)
        self.head = nn.Conv2d(8, K, 1)
        with torch.no_grad():  # statistics that differ from any batch's, so train-mode BatchNorm would show
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward(self, x):
        return self.head(self.dropout(torch.relu(self.bn(self.conv(x)))))


@pytest.fixture()
def net():
    torch.manual_seed(0)
    return DropoutNet().eval()


def test_dropout_modules_are_dropout_layers_and_drop_path_blocks_with_a_positive_rate():
    model = nn.Sequential(nn.Dropout(0.1), nn.Dropout2d(0.0), Block(8, 1, 1, 1, 0.2), Block(8, 1, 1, 1, 0.0), nn.BatchNorm2d(4))
    assert dropout_modules(model) == [model[0], model[2]]
    assert dropout_modules(nn.Identity()) == []


def test_a_model_without_dropout_is_refused():
    with pytest.raises(UserError, match="no dropout or drop-path layer with a rate > 0; use a model trained with"):
        mc_dropout(nn.Sequential(nn.Dropout(0.0), nn.BatchNorm2d(3)), torch.zeros(1, 3, 2, 2))


def test_only_dropout_layers_train_and_every_flag_is_restored(net):
    inner = nn.Sequential(net, nn.Dropout(0.2)).eval()
    inner[1].train()  # a module already in training mode stays so
    before = {name: m.training for name, m in inner.named_modules()}
    with dropout_enabled(inner):
        training = {name for name, m in inner.named_modules() if m.training}
        assert training == {"0.dropout", "1"}
    assert before == {name: m.training for name, m in inner.named_modules()}


def test_mc_dropout_equals_passes_run_by_hand(net):
    images = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    result = mc_dropout(net, images, samples=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched

    torch.manual_seed(7)
    net.dropout.train()
    with torch.no_grad():
        passes = torch.stack([net(images).softmax(1) for _ in range(4)])
    net.dropout.eval()
    p = passes.double().numpy()
    mean = p.mean(0)
    K = p.shape[2]

    def normalised_entropy(q):
        return -(q * np.log(q)).sum(-3) / math.log(K)

    np.testing.assert_allclose(result.probs.numpy(), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.entropy.numpy(), normalised_entropy(mean), rtol=0, atol=1e-5)
    information = normalised_entropy(mean) - normalised_entropy(p).mean(0)
    np.testing.assert_allclose(result.mutual_information.numpy(), information, rtol=0, atol=1e-5)
    assert result.mutual_information.max() > 1e-3
    assert torch.equal(net.bn.running_mean, torch.full((8,), 0.3))  # BatchNorm never saw a batch


def test_mc_dropout_is_reproducible_and_depends_on_the_seed(net):
    images = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    first, again = mc_dropout(net, images, samples=3, seed=1), mc_dropout(net, images, samples=3, seed=1)
    other = mc_dropout(net, images, samples=3, seed=2)
    assert torch.equal(first.entropy, again.entropy) and torch.equal(first.probs, again.probs)
    assert not torch.equal(first.probs, other.probs)


class DropPathNet(nn.Module):
    """1x1 conv embedding -> one SegFormer block with stochastic depth 0.5 -> 1x1 conv head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.block = Block(8, 1, 1, 2, 0.5)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        height, width = x.shape[-2:]
        tokens = self.block(self.embed(x).flatten(2).transpose(1, 2), height, width)
        return self.head(tokens.transpose(1, 2).unflatten(2, (height, width)))


def test_drop_path_alone_makes_the_passes_differ():
    torch.manual_seed(0)
    result = mc_dropout(DropPathNet().eval(), torch.randn(4, 3, 2, 2), samples=6, seed=0)
    assert result.mutual_information.max() > 1e-4


@pytest.mark.parametrize("samples", [0, -1, 1.5])
def test_bad_sample_counts_are_refused(net, samples):
    with pytest.raises(UserError, match="samples must be a positive integer"):
        mc_dropout(net, torch.zeros(1, 3, 2, 2), samples=samples)
