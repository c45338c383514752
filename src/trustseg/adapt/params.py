"""What test-time adaptation may change: the affine parameters of the normalisation layers, nothing else.

TENT (Wang et al., ICLR 2021, `tent.py::configure_model`) updates only BatchNorm scale and shift and
normalises with the statistics of the test batch. SAR (Niu et al., ICLR 2023, `sar.py`) also updates
LayerNorm and GroupNorm affine parameters, which is what transformers (ViT, SegFormer) and GroupNorm
U-Nets have; those layers have no running statistics, so only their affine parameters matter.
"""

from __future__ import annotations

from torch import nn

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


def configure_for_adaptation(model: nn.Module, what: str = "the model") -> dict[str, nn.Parameter]:
    """Freeze `model` but for its normalisation layers' affine parameters, which are returned (name ->
    parameter); make every BatchNorm normalise with the statistics of the batch it sees.

    The running statistics are dropped (``running_mean = running_var = None``, as TENT does), so BatchNorm
    uses batch statistics in eval mode too: the model stays in eval mode, dropout off, and the batch alone
    sets the normalisation. The change is in place; adapt a copy to keep the source model.
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
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
    return parameters
