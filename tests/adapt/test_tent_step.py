"""TENT's update against a hand computation, and what adaptation may and may not change."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from trustseg.adapt.params import configure_for_adaptation, norm_parameters
from trustseg.adapt.predictor import AdaptConfig, AdaptingPredictor
from trustseg.errors import UserError

EPS = 1e-5  # BatchNorm's default


def tiny_bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1))
    with torch.no_grad():  # affine parameters and running stats away from their defaults
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


def numpy_tent(model, images, prior=0.0):
    """Logits of `model` with test-batch BatchNorm statistics (mixed with the running ones weighted as
    `prior` images against the batch's images) and the gradient of the mean pixel entropy with respect to
    the BatchNorm scale and shift, by the explicit chain rule:
    dH/dz_k = -p_k (log p_k + H);  dL/dy_c = sum_k W2[k, c] dL/dz_k;  dgamma = sum dL/dy * xhat, dbeta = sum dL/dy."""
    conv1, bn, conv2 = model
    x = images.double().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)  # (N, 3) pixels
    w1, b1 = conv1.weight.detach().double().numpy()[:, :, 0, 0], conv1.bias.detach().double().numpy()
    w2, b2 = conv2.weight.detach().double().numpy()[:, :, 0, 0], conv2.bias.detach().double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    a = x @ w1.T + b1
    n = len(images)
    mean = (prior * bn.running_mean.double().numpy() + n * a.mean(0)) / (prior + n)
    var = (prior * bn.running_var.double().numpy() + n * a.var(0)) / (prior + n)  # biased, as BatchNorm normalises
    xhat = (a - mean) / np.sqrt(var + EPS)
    z = (gamma * xhat + beta) @ w2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(p)).sum(1)
    dz = -p * (np.log(p) + entropy[:, None]) / len(x)
    dy = dz @ w2
    b, _, h, w = images.shape
    return z.reshape(b, h, w, 3).transpose(0, 3, 1, 2), (dy * xhat).sum(0), dy.sum(0)


@pytest.mark.parametrize("optimizer,prior", [("sgd", 0.0), ("adam", 0.0), ("adam", 3.0)])
def test_tent_step_matches_hand_computation(optimizer, prior):
    model = tiny_bn_model()
    images = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    logits, grad_gamma, grad_beta = numpy_tent(model, images, prior)
    gamma, beta = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    lr = 0.1
    adapter = AdaptingPredictor(model, 3, AdaptConfig(optimizer=optimizer, lr=lr, momentum=0.9, guard=None,
                                                      bn_prior=prior))
    with torch.inference_mode():  # as inside the evaluation loop
        returned = adapter(images)
    np.testing.assert_allclose(returned.numpy(), logits, rtol=1e-4, atol=1e-5)  # the forward before the update
    # SGD's first step with momentum is lr * g (the buffer starts at g); Adam's, bias-corrected, is lr * g / (|g| + eps)
    def step(g):
        return lr * g if optimizer == "sgd" else lr * g / (np.abs(g) + 1e-8)
    bn = adapter.model[1]
    np.testing.assert_allclose(bn.weight.detach().numpy(), gamma - step(grad_gamma), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.bias.detach().numpy(), beta - step(grad_beta), rtol=1e-4, atol=1e-6)
    assert adapter.summary()["updates"] == 1


def test_only_norm_affine_parameters_change_and_the_source_stays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 3, 1)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = AdaptingPredictor(model, 3, AdaptConfig(lr=0.05, guard=None))
    assert list(adapter.parameters) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255
    for _ in range(3):
        adapter(images)
    after = adapter.model.state_dict()
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
        assert not torch.equal(after[name], before[name]), name
    for name in ("0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"):
        assert torch.equal(after[name], before[name]), name
    assert "3.running_mean" not in after  # test-batch statistics only
    for name, value in model.state_dict().items():  # the wrapped source model is untouched
        assert torch.equal(value, before[name]), name


def test_norm_parameters_finds_layer_and_group_norm():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GroupNorm(1, 4), nn.BatchNorm2d(4, affine=False))
    assert list(norm_parameters(model)) == ["1.weight", "1.bias", "2.weight", "2.bias"]


def test_batchnorm_uses_test_batch_statistics_in_eval_mode():
    model = tiny_bn_model()
    configure_for_adaptation(model)
    images = torch.randn(3, 3, 4, 4)
    features = model[0](images)
    expected = (features - features.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        features.var((0, 2, 3), unbiased=False, keepdim=True) + EPS)
    expected = expected * model[1].weight.view(1, -1, 1, 1) + model[1].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(model[1](features), expected, rtol=1e-5, atol=1e-5)
    assert not model.training


def test_the_batchnorm_prior_spans_batch_statistics_to_the_source_model():
    """The prior keeps the running statistics; a tiny prior is the batch alone, a huge one the source
    model; gradients reach the layers before the BatchNorm through the batch's share of the statistics;
    a deep copy of the configured model normalises with its own parameters."""
    images = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    source = tiny_bn_model()
    with torch.no_grad():
        expected_source = source(images)
    batch_only = tiny_bn_model()
    configure_for_adaptation(batch_only)
    for prior, expected in ((1e-9, batch_only(images)), (1e9, expected_source)):
        model = tiny_bn_model()
        configure_for_adaptation(model, bn_prior=prior)
        assert model[1].running_mean is not None and not model.training
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)

    model = tiny_bn_model()
    configure_for_adaptation(model, bn_prior=1.0)
    features = model[0](images).detach().requires_grad_(True)
    output = model[1](features)
    mean = 0.5 * model[1].running_mean + 0.5 * features.mean((0, 2, 3))  # one image against a prior of one
    var = 0.5 * model[1].running_var + 0.5 * features.var((0, 2, 3), unbiased=False)
    normalised = (features - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
    expected = normalised * model[1].weight.view(1, -1, 1, 1) + model[1].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    gradient, expected_gradient = (torch.autograd.grad((y ** 2).sum(), features)[0] for y in (output, expected))
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-5)

    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied[1].weight.mul_(2)
    assert not torch.allclose(copied[1](features), model[1](features))


def test_a_model_without_normalisation_layers_is_a_user_error():
    with pytest.raises(UserError, match="the toy model has no normalisation layer"):
        AdaptingPredictor(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), 3, what="the toy model")


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=generator) for _ in range(count)]


def test_episodic_resets_exactly_to_the_source_and_online_carries_state():
    stream, probe = batches(3), batches(1, seed=5)[0]
    config = AdaptConfig(mode="episodic", optimizer="sgd", lr=0.5, guard=None)
    fresh = AdaptingPredictor(tiny_bn_model(), 3, config)
    source_state = {k: v.clone() for k, v in fresh.initial.items()}
    expected = fresh(probe)
    episodic = AdaptingPredictor(tiny_bn_model(), 3, config)
    for images in stream:
        episodic(images)
    assert any(not torch.equal(p, source_state[n]) for n, p in episodic.parameters.items())  # it did adapt
    torch.testing.assert_close(episodic(probe), expected, rtol=0, atol=0)  # history forgotten
    before_update = torch.from_numpy(numpy_tent(tiny_bn_model(), probe)[0]).float()
    assert not torch.allclose(expected, before_update, atol=1e-3)  # episodic "auto" predicts after the update
    episodic.reset()
    for name, parameter in episodic.parameters.items():
        assert torch.equal(parameter, source_state[name])

    online_config = AdaptConfig(mode="online", optimizer="sgd", lr=0.5, guard=None)
    online, first = AdaptingPredictor(tiny_bn_model(), 3, online_config), AdaptingPredictor(tiny_bn_model(), 3, online_config)
    for images in stream:
        online(images)
    assert not torch.allclose(online(probe), first(probe))  # the stream's updates carried over
    assert online.summary()["updates"] == 4 and online.summary()["batches"] == 4
