"""What test-time adaptation may change: the affine parameters of the normalisation layers, nothing else.

TENT (Wang et al., ICLR 2021, `tent.py::configure_model`) updates only BatchNorm scale and shift and
normalises with the statistics of the test batch. SAR (Niu et al., ICLR 2023, `sar.py`) also updates
LayerNorm and GroupNorm affine parameters, which is what transformers (ViT, SegFormer) and GroupNorm
U-Nets have; those layers have no running statistics, so only their affine parameters matter.

The statistics of one test image describe a new scene poorly: Schneider et al. (NeurIPS 2020, "Improving
robustness against common corruptions by covariate shift adaptation", eq. 2) keep the source statistics
as a prior worth N pseudo-samples against the n samples of the batch,
    mean = (N mean_source + n mean_batch) / (N + n),   var = (N var_source + n var_batch) / (N + n),
so N = 0 is the batch alone (TENT) and N -> infinity the source model.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from trustseg.errors import UserError

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> affine parameter (weight, bias) of every normalisation layer of `model`, in module order."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            for name, parameter in module.named_parameters(recurse=False):
                found[f"{module_name}.{name}" if module_name else name] = parameter
    return found


def configure_for_adaptation(model: nn.Module, what: str = "the model",
                             bn_prior: float = 0.0) -> dict[str, nn.Parameter]:
    """Freeze `model` but for its normalisation layers' affine parameters, which are returned (name ->
    parameter); make every BatchNorm normalise with the statistics of the batch it sees, mixed with its
    running (source) statistics weighted as `bn_prior` images when that is above 0.

    Without a prior the running statistics are dropped (``running_mean = running_var = None``, as TENT
    does), so BatchNorm uses batch statistics in eval mode too. Either way the model stays in eval mode,
    dropout off. The change is in place; adapt a copy to keep the source model.
    A model without such parameters cannot be adapted this way: UserError naming `what`.
    """
    parameters = norm_parameters(model)
    if not parameters:
        raise UserError(f"{what} has no normalisation layer with affine parameters (BatchNorm, LayerNorm or "
                        "GroupNorm); test-time adaptation of the TENT kind updates only those")
    model.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if bn_prior > 0 and module.running_mean is not None:
            module.bn_prior = bn_prior
            module.forward = types.MethodType(normalise_with_prior, module)  # a bound method: deep copies rebind
        else:
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return parameters


def normalise_with_prior(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """`bn` normalising (B, C, ...) `x` with its running statistics weighted as `bn.bn_prior` samples and
    the batch's as B (the module docstring's formula), in float32; gradients flow through the batch's."""
    dims = [0, *range(2, x.ndim)]
    batch_share = x.shape[0] / (bn.bn_prior + x.shape[0])
    values = x.float()
    batch_var, batch_mean = torch.var_mean(values, dims, unbiased=False)
    mean = torch.lerp(bn.running_mean, batch_mean, batch_share)
    var = torch.lerp(bn.running_var, batch_var, batch_share)
    shape = (1, -1, *[1] * (x.ndim - 2))
    normalised = (values - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.affine:
        normalised = normalised * bn.weight.view(shape) + bn.bias.view(shape)
    return normalised.to(x.dtype)
