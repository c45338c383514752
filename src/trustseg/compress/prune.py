"""Global structural pruning of a ViT backbone: whole attention heads and MLP hidden units (NViT).

Yang et al., "Global Vision Transformer Pruning with Hessian-Aware Saliency" (NViT, CVPR 2023) rank the
prunable structures of all blocks in ONE list by a saliency that is comparable across layers and
structure types, and remove the least salient until a cost target is met. Here:

- Units: the heads of every block (a head = its q, k and v rows of ``qkv`` and its columns of ``proj``)
  and the MLP hidden units (a unit = its row and bias entry of ``fc1`` and its column of ``fc2``). The
  embedding width E and the head size d stay, so the position embedding, CLS/register tokens, RoPE
  (which turns each head's d channels) and the decode head are untouched.
- Importance ``"taylor"`` (NViT's group Taylor saliency): per calibration batch
  ``(sum over the unit's weights of w * dL/dw)**2`` -- the first-order loss change of removing the unit,
  squared, an empirical-Fisher estimate of the second-order change -- averaged over the batches; L is
  the segmentation cross-entropy over the pixels not equal to ``ignore_index``. NViT's code also
  divides some groups by hand-tuned constants and ranks fixed-size groups (2 heads, 16 MLP units);
  neither is done here: single heads and units are ranked by the plain saliency.
- Importance ``"magnitude"`` (no data): the L2 norm of the unit's weights divided by the mean norm of
  its kind (heads, MLP units), since a head (4 E d weights) and an MLP unit (2 E + 1) are not on one
  scale, times the unit's FLOPs: a unit of average norm is worth what it costs, so heads and MLP units
  are removed in proportion (ranked per FLOP, the order is that of the relative norms).
- Selection: units are visited in increasing order of importance per FLOP saved (a head costs
  ``2 (4 N E d + 2 N^2 d)`` FLOPs at N tokens, an MLP unit ``2 (2 N E)``); each is removed if the model's
  FLOPs stay at or above the target, every block keeping at least one head and one MLP unit. The kept
  FLOPs end at most one MLP unit's cost above the target.
- Surgery: the kept rows and columns are copied into physically smaller ``nn.Linear`` layers (real
  savings, no masks) and the backbone's config records the per-block sizes (``block_heads``,
  ``block_mlp_hidden``), which a pruned checkpoint keeps as model options.

Why hand-written surgery rather than a dependency-graph library such as torch-pruning: our ``qkv`` is
one fused layer whose rows are laid out (q|k|v, head, channel), attention runs in SDPA (the graph sees
no per-head structure), and whole heads of a fixed size are the only unit that leaves RoPE and the
attention scale unchanged. With the embedding width fixed, the surgery is a few index computations,
and the result is an ordinary ``ViTConfig`` that builds from a checkpoint, not a pickled module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.compress.reducers import find_vit
from trustseg.data.base import SegmentationDataset
from trustseg.engine.checkpoint import Checkpoint
from trustseg.engine.inference import Predictor, model_from_checkpoint
from trustseg.errors import UserError
from trustseg.models.flops import count_flops
from trustseg.models.vit import Block, ViT, ViTConfig

Importance = Literal["taylor", "magnitude"]
IMPORTANCES = ("taylor", "magnitude")
PURPOSE = "structural pruning"
Batches = Iterable[tuple[Tensor, Tensor]]  # (inputs of `forward` (B, 3, H, W), masks (B, H, W))


@dataclass(frozen=True)
class BlockScores:
    """One score per head (H_b,) and per MLP hidden unit (M_b,) of one block."""

    heads: Tensor
    mlp: Tensor


# ---------------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------------


def _unit_sums(block: Block, values: Callable[[Tensor], Tensor]) -> BlockScores:
    """Sum `values(param)` (elementwise, shaped like param) over the weights of each head and MLP unit."""
    attn, mlp = block.attn, block.mlp
    h, d = attn.num_heads, attn.head_dim
    heads = values(attn.qkv.weight).view(3, h, d, -1).sum(dim=(0, 2, 3))  # rows: (q|k|v, head, channel)
    if attn.qkv.bias is not None:
        heads = heads + values(attn.qkv.bias).view(3, h, d).sum(dim=(0, 2))
    heads = heads + values(attn.proj.weight).view(-1, h, d).sum(dim=(0, 2))
    units = values(mlp.fc1.weight).sum(dim=1) + values(mlp.fc1.bias) + values(mlp.fc2.weight).sum(dim=0)
    return BlockScores(heads, units)


def _unit_parameters(vit: ViT) -> list[nn.Parameter]:
    """Every parameter that belongs to a prunable unit."""
    params: list[nn.Parameter] = []
    for block in vit.blocks:
        attn, mlp = block.attn, block.mlp
        params += [attn.qkv.weight, attn.proj.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight]
        if attn.qkv.bias is not None:
            params.append(attn.qkv.bias)
    return params


def magnitude_importance(model: nn.Module) -> list[BlockScores]:
    """L2 norm of each unit's weights, divided by the mean norm over all units of its kind."""
    vit = find_vit(model, PURPOSE)
    with torch.no_grad():
        norms = [_unit_sums(block, lambda p: p.double() ** 2) for block in vit.blocks]
    norms = [BlockScores(s.heads.sqrt(), s.mlp.sqrt()) for s in norms]
    tiny = torch.finfo(torch.float64).tiny  # an all-zero model: every unit scores 0
    head_mean = torch.cat([s.heads for s in norms]).mean().clamp_min(tiny)
    mlp_mean = torch.cat([s.mlp for s in norms]).mean().clamp_min(tiny)
    return [BlockScores(s.heads / head_mean, s.mlp / mlp_mean) for s in norms]


def taylor_importance(
    model: nn.Module,
    data: Batches,
    *,
    ignore_index: int,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> list[BlockScores]:
    """NViT's saliency, the mean over the batches of ``(sum_{w in unit} w * dL/dw)**2``.

    Args:
        model: the model whose backbone's units are scored; evaluated in eval mode (no drop path), its
            mode, ``requires_grad`` flags and ``.grad`` fields are left as they were.
        data: batches ``(images, masks)``; images are what `forward` takes, masks (B, H, W) class indices.
        forward: images -> logits (B, K, H, W) through `model` (default: `model` itself; e.g. a
            ``Predictor`` that normalises raw images).
    """
    vit = find_vit(model, PURPOSE)
    forward = model if forward is None else forward
    params = _unit_parameters(vit)
    device = params[0].device
    was_training, flags = model.training, [p.requires_grad for p in params]
    totals: list[BlockScores] | None = None
    count = 0
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for images, masks in data:
            logits = forward(images.to(device))
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 -> fp32, keeps fp64
            masks = masks.to(device).long()
            # the mean over labelled pixels; a batch without any gives a zero loss instead of NaN
            labelled = (masks != ignore_index).sum().clamp_min(1)
            loss = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum") / labelled
            grads = dict(zip(params, torch.autograd.grad(loss, params)))
            with torch.no_grad():
                sums = [_unit_sums(block, lambda p: p.double() * grads[p].double()) for block in vit.blocks]
            squares = [BlockScores(s.heads**2, s.mlp**2) for s in sums]
            totals = squares if totals is None else [
                BlockScores(t.heads + s.heads, t.mlp + s.mlp) for t, s in zip(totals, squares)]
            count += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if totals is None:
        raise UserError("importance='taylor' needs calibration data: at least one (images, masks) batch")
    return [BlockScores(t.heads / count, t.mlp / count) for t in totals]


# ---------------------------------------------------------------------------------------------------
# Cost and selection
# ---------------------------------------------------------------------------------------------------


def unit_flops(cfg: ViTConfig, image_size: tuple[int, int]) -> tuple[int, int]:
    """FLOPs (2 per multiply-add, as ``models/flops.py`` counts) of one head and of one MLP hidden unit
    of a block, for one image of `image_size` (H, W).

    With N tokens, width E and head size d a head costs q, k, v (3 N E d) + q k^T and attn v (2 N^2 d)
    + its share of proj (N d E) multiply-adds; an MLP unit costs fc1 (N E) + fc2 (N E).
    """
    n = cfg.num_prefix_tokens + (image_size[0] // cfg.patch_size) * (image_size[1] // cfg.patch_size)
    e, d = cfg.embed_dim, cfg.head_dim
    return 2 * (4 * n * e * d + 2 * n * n * d), 2 * (2 * n * e)


def select_units(
    scores: Sequence[BlockScores], head_flops: int, mlp_unit_flops: int, *, total_flops: int, target_flops: float
) -> tuple[list[list[int]], list[list[int]]]:
    """(kept heads per block, kept MLP units per block), sorted indices.

    Units are visited in increasing order of score per FLOP; one is removed when the FLOPs stay
    >= `target_flops` and its block keeps at least one unit of its kind.
    """
    keys, kinds, blocks, indices = [], [], [], []
    for b, s in enumerate(scores):
        for kind, values, cost in ((0, s.heads, head_flops), (1, s.mlp, mlp_unit_flops)):
            keys.append(values.double().cpu() / cost)
            kinds += [kind] * len(values)
            blocks += [b] * len(values)
            indices += range(len(values))
    order = torch.argsort(torch.cat(keys), stable=True).tolist()
    kept = [[set(range(len(s.heads))) for s in scores], [set(range(len(s.mlp))) for s in scores]]
    costs = (head_flops, mlp_unit_flops)
    flops = total_flops
    for i in order:
        if flops - min(costs) < target_flops:
            break
        kind, b = kinds[i], blocks[i]
        if flops - costs[kind] >= target_flops and len(kept[kind][b]) > 1:
            kept[kind][b].remove(indices[i])
            flops -= costs[kind]
    return [sorted(k) for k in kept[0]], [sorted(k) for k in kept[1]]


# ---------------------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------------------


def _sliced_linear(layer: nn.Linear, *, rows: Tensor | None = None, columns: Tensor | None = None) -> nn.Linear:
    """A new Linear holding exactly `rows` (outputs) and `columns` (inputs) of `layer` (None = all)."""
    weight, bias = layer.weight, layer.bias
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.requires_grad_(layer.weight.requires_grad)
    return new


def prune_blocks_(vit: ViT, keep_heads: Sequence[Sequence[int]], keep_mlp: Sequence[Sequence[int]]) -> None:
    """Keep only the given heads and MLP units of each block of `vit`, in place (layers are replaced)."""
    if len(keep_heads) != len(vit.blocks) or len(keep_mlp) != len(vit.blocks):
        raise UserError(f"prune_blocks_: one list of kept heads and one of kept MLP units per block "
                        f"({len(vit.blocks)}) expected")
    for b, (block, heads, units) in enumerate(zip(vit.blocks, keep_heads, keep_mlp)):
        attn, mlp = block.attn, block.mlp
        for name, kept, size in (("heads", heads, attn.num_heads), ("MLP units", units, mlp.fc1.out_features)):
            if not kept or len(set(kept)) != len(kept) or not all(0 <= i < size for i in kept):
                raise UserError(f"prune_blocks_: block {b} keeps {name} {list(kept)}; expected distinct "
                                f"indices in [0, {size}), at least one")
        device, d = attn.qkv.weight.device, attn.head_dim
        inner = attn.num_heads * d
        channels = (torch.tensor(sorted(heads), device=device)[:, None] * d + torch.arange(d, device=device)).flatten()
        attn.qkv = _sliced_linear(attn.qkv, rows=torch.cat([channels + j * inner for j in range(3)]))
        attn.proj = _sliced_linear(attn.proj, columns=channels)
        attn.num_heads = len(heads)
        kept_units = torch.tensor(sorted(units), device=device)
        mlp.fc1 = _sliced_linear(mlp.fc1, rows=kept_units)
        mlp.fc2 = _sliced_linear(mlp.fc2, columns=kept_units)
    vit.config = replace(vit.config, block_heads=tuple(b.attn.num_heads for b in vit.blocks),
                         block_mlp_hidden=tuple(b.mlp.fc1.out_features for b in vit.blocks))


# ---------------------------------------------------------------------------------------------------
# The whole procedure
# ---------------------------------------------------------------------------------------------------


def _check_image_size(image_size: Any, patch_size: int) -> tuple[int, int]:
    ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % patch_size == 0 for v in image_size))
    if not ok:
        raise UserError(f"image_size={image_size!r}; expected (H, W), positive multiples of the patch size {patch_size}")
    return int(image_size[0]), int(image_size[1])


def prune_model(
    model: nn.Module,
    flops_ratio: float,
    *,
    importance: Importance = "taylor",
    data: Batches | None = None,
    image_size: tuple[int, int] = (512, 512),
    ignore_index: int = 255,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of `model` (left unchanged) whose FLOPs at `image_size` are `flops_ratio` of its own.

    Args:
        model: a ViT or a segmenter whose ``backbone`` is a ViT.
        flops_ratio: kept FLOPs / original FLOPs of the whole model, in (0, 1]; 1 removes nothing.
        importance: ``"taylor"`` (needs `data`) or ``"magnitude"``.
        data, ignore_index, forward: calibration batches for ``"taylor"`` (see :func:`taylor_importance`).
        image_size: (H, W) of the one image at which FLOPs are counted (with ``models/flops.py``).

    Returns:
        (pruned model, report): the report holds the target and counted FLOP ratio, FLOPs and parameter
        counts before and after, and the per-block ``block_heads`` and ``block_mlp_hidden``.
    """
    vit = find_vit(model, PURPOSE)
    valid_ratio = isinstance(flops_ratio, (int, float)) and not isinstance(flops_ratio, bool) and 0 < flops_ratio <= 1
    if not valid_ratio:
        raise UserError(f"flops_ratio={flops_ratio!r}; expected a number in (0, 1] (kept / original FLOPs)")
    if importance not in IMPORTANCES:
        raise UserError(f"importance={importance!r}; expected one of {', '.join(IMPORTANCES)}")
    image_size = _check_image_size(image_size, vit.config.patch_size)
    head_flops, mlp_unit_flops = unit_flops(vit.config, image_size)
    if importance == "taylor":
        if data is None:
            raise UserError("importance='taylor' needs calibration data; pass data or use importance='magnitude'")
        scores = taylor_importance(model, data, ignore_index=ignore_index, forward=forward)
    else:
        scores = [BlockScores(s.heads * head_flops, s.mlp * mlp_unit_flops) for s in magnitude_importance(model)]
    input_shape = (1, vit.config.in_chans, *image_size)
    total = count_flops(model, input_shape)
    units = sum(len(s.heads) * head_flops + len(s.mlp) * mlp_unit_flops for s in scores)
    least = total - units + len(scores) * (head_flops + mlp_unit_flops)
    if flops_ratio * total < least:
        raise UserError(f"flops_ratio={flops_ratio} is below {least / total:.3f}, the least this model keeps at "
                        f"{image_size[0]}x{image_size[1]} (one head and one MLP unit per block)")
    keep_heads, keep_mlp = select_units(scores, head_flops, mlp_unit_flops, total_flops=total,
                                        target_flops=flops_ratio * total)
    pruned = copy.deepcopy(model)
    pruned_vit = find_vit(pruned, PURPOSE)
    prune_blocks_(pruned_vit, keep_heads, keep_mlp)
    kept = count_flops(pruned, input_shape)
    report = {
        "importance": importance,
        "image_size": list(image_size),
        "flops_ratio_target": float(flops_ratio),
        "flops_ratio": kept / total,
        "flops_original": total,
        "flops_pruned": kept,
        "params_original": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in pruned.parameters()),
        "heads_removed": sum(len(s.heads) - len(k) for s, k in zip(scores, keep_heads)),
        "mlp_units_removed": sum(len(s.mlp) - len(k) for s, k in zip(scores, keep_mlp)),
        "block_heads": list(pruned_vit.config.block_heads),
        "block_mlp_hidden": list(pruned_vit.config.block_mlp_hidden),
    }
    return pruned, report


def prune_checkpoint(
    checkpoint: Checkpoint,
    flops_ratio: float,
    *,
    importance: Importance = "taylor",
    dataset: SegmentationDataset | None = None,
    num_samples: int = 16,
    image_size: tuple[int, int] = (512, 512),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Checkpoint, dict[str, Any]]:
    """The checkpoint of the pruned model: its weights, and the per-block sizes as model options, so that
    ``trustseg eval --checkpoint`` builds it with nothing else.

    ``"taylor"`` scores on `num_samples` samples of `dataset` drawn with `seed`, one image per batch (at its
    own size), normalised with the checkpoint's mean and std. The pruned checkpoint has no training
    state (the optimizer's shapes no longer fit) and no calibrator (it was fitted to the unpruned model).
    """
    name = checkpoint.model["name"]
    if name != "vit_segmenter":
        raise UserError(f"{checkpoint.source}: structural pruning needs a ViT backbone; model {name!r} has none")
    model = model_from_checkpoint(checkpoint).to(device)
    data, forward = None, None
    if importance == "taylor":
        if dataset is None or len(dataset) == 0:
            raise UserError("importance='taylor' needs a calibration dataset with at least one sample")
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise UserError(f"num_samples={num_samples!r}; expected an int >= 1")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
        data = ((sample["image"][None], sample["mask"][None]) for sample in map(dataset.__getitem__, order))
        forward = Predictor(model, checkpoint.mean, checkpoint.std).to(device)  # normalises, pads to the stride
    pruned, report = prune_model(model, flops_ratio, importance=importance, data=data, image_size=image_size,
                                 ignore_index=checkpoint.classes.ignore_index, forward=forward)
    options = {**checkpoint.model.get("options", {}), "block_heads": report["block_heads"],
               "block_mlp_hidden": report["block_mlp_hidden"]}
    pruned_checkpoint = Checkpoint(
        model={"name": name, "options": options},
        state_dict={key: value.detach().cpu() for key, value in pruned.state_dict().items()},
        classes=checkpoint.classes,
        mean=checkpoint.mean,
        std=checkpoint.std,
        train_config=checkpoint.train_config,
    )
    return pruned_checkpoint, report
