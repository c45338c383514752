"""Segmentation loss: cross-entropy with ignored pixels, class weights and online hard example mining.

Pure tensor functions; the class statistics are streamed over masks so any dataset size fits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def class_statistics(mask: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-class counts of one mask (H, W): (pixels of class k, labelled pixels of the image if k occurs
    in it else 0), both int64 (K,). Summed over a dataset they feed :func:`class_weights`."""
    labels = mask.flatten()
    labels = labels[labels != ignore_index].long()
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(f"mask holds label {int(labels.max())} >= num_classes {num_classes}")
    pixels = torch.bincount(labels, minlength=num_classes)
    image_pixels = torch.where(pixels > 0, labels.numel(), 0)
    return pixels, image_pixels


def class_weights(method: str, pixels: Tensor, image_pixels: Tensor) -> Tensor:
    """Per-class loss weights (K,) float32 from dataset-wide counts (see :func:`class_statistics`).

    ``median_frequency`` (Eigen & Fergus, ICCV 2015): freq_k = pixels_k / labelled pixels of the images
    containing k; weight_k = median(freq) / freq_k, so the median class weighs 1.
    ``sqrt_inverse``: weight_k = 1 / sqrt(pixels_k / all labelled pixels), scaled to mean 1.
    Classes that never occur get weight 0: no pixel of theirs is ever weighed, and a large weight would
    only distort the mean. Medians and means run over the classes that occur.
    """
    pixels, image_pixels = pixels.double(), image_pixels.double()
    present = pixels > 0
    if not bool(present.any()):
        raise ValueError("no labelled pixels: cannot compute class weights")
    weights = torch.zeros_like(pixels)
    if method == "median_frequency":
        freq = pixels[present] / image_pixels[present]
        weights[present] = torch.quantile(freq, 0.5) / freq  # quantile 0.5 averages the middle two
    elif method == "sqrt_inverse":
        inv = 1.0 / torch.sqrt(pixels[present] / pixels.sum())
        weights[present] = inv / inv.mean()
    else:
        raise ValueError(f"unknown class weighting {method!r}")
    return weights.float()


def ohem_mask(
    pixel_loss: Tensor, valid: Tensor, *, threshold: float | None = None, min_kept: float | None = None
) -> Tensor:
    """Which pixels count (bool, same shape as ``pixel_loss``): valid pixels whose loss exceeds
    ``threshold``, topped up with the hardest valid pixels until at least ``ceil(min_kept * #valid)`` are
    kept (as mmsegmentation's OHEM sampler). With only ``min_kept``: exactly the top fraction."""
    keep = valid.clone() if threshold is None else valid & (pixel_loss > threshold)
    if min_kept is None:
        return keep
    num_valid = int(valid.sum())
    wanted = min(num_valid, math.ceil(min_kept * num_valid))
    if threshold is not None and int(keep.sum()) >= wanted:
        return keep
    scores = torch.where(valid, pixel_loss, torch.full_like(pixel_loss, -math.inf)).flatten()
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep[scores.topk(wanted, sorted=False).indices] = True
    return keep.view_as(valid)


def segmentation_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int,
    weight: Tensor | None = None,
    ohem_threshold: float | None = None,
    ohem_min_kept: float | None = None,
) -> Tensor:
    """Weighted mean cross-entropy over the kept pixels: logits (B, K, H, W), target (B, H, W) -> scalar.

    Without OHEM this equals ``F.cross_entropy(logits, target, weight, ignore_index=ignore_index)``.
    OHEM ranks pixels by their unweighted loss, so class weights change how much, not which, pixels count.
    A batch without labelled pixels gives a zero loss that still has a graph.
    """
    pixel_loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if ohem_threshold is not None or ohem_min_kept is not None:
        keep = ohem_mask(pixel_loss.detach(), valid, threshold=ohem_threshold, min_kept=ohem_min_kept)
    else:
        keep = valid
    pixel_weight = keep.to(pixel_loss.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight.to(pixel_loss)[torch.where(valid, target, 0)]
    total = pixel_weight.sum()
    if float(total) == 0.0:
        return (pixel_loss * 0.0).sum()
    return (pixel_loss * pixel_weight).sum() / total
