"""Active Spatial Guidance (Liu et al., "Active Spatial Guidance: Eliminating Injected Positional
Mechanisms in Vision Transformers", 2026): a ViT trained and run without any positional embedding
learns where its tokens lie from an auxiliary task during training only.

Two MLPs (D -> 256 -> ReLU -> 1) regress each final-layer patch token's row and column, read from the
last block's output before the final norm (prefix tokens excluded), against r / (H_p - 1) and
c / (W_p - 1) of the current grid, so any resolution and aspect ratio trains. Loss: the mean of the
row and column losses (SmoothL1 with beta 1 by default), weighted by lambda warmed up linearly
from lambda_min to lambda_max over the first optimiser steps. The head is dropped after training:
the model that is saved and run is exactly the plain segmenter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError
from trustseg.models.positions import grid_positions, position_error
from trustseg.training.config import ASGConfig

HIDDEN = 256  # width of the row and column MLPs (the paper's code)
LOSSES = {"smooth_l1": lambda p, t: F.smooth_l1_loss(p, t, beta=1.0), "l1": F.l1_loss, "mse": F.mse_loss}


class PositionHead(nn.Module):
    """(B, N, D) patch tokens -> (B, N, 2) predicted (row, col), each in [0, 1] units of the grid."""

    def __init__(self, dim: int, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.row = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.col = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.cat((self.row(tokens), self.col(tokens)), dim=-1)


def position_loss(predicted: Tensor, grid: tuple[int, int], kind: str = "smooth_l1") -> Tensor:
    """Mean over the row and column of the per-token loss, averaged over all tokens of the batch."""
    target = grid_positions(grid, predicted.device).expand_as(predicted)
    loss = LOSSES[kind]
    return (loss(predicted[..., 0], target[..., 0]) + loss(predicted[..., 1], target[..., 1])) / 2


def guidance_weight(config: ASGConfig, step: int) -> float:
    """lambda at optimiser step `step` (0-based): lambda_min + (lambda_max - lambda_min) * min(1, (step+1)/warmup)."""
    ramp = 1.0 if config.warmup_steps == 0 else min(1.0, (step + 1) / config.warmup_steps)
    return config.lambda_min + (config.lambda_max - config.lambda_min) * ramp


class GuidedSegmenter(nn.Module):
    """A ViT segmenter with ASG's position head, trained as one module (one DDP wrapper):
    images -> (logits, position loss, position error in patches)."""

    def __init__(self, segmenter: nn.Module, config: ASGConfig) -> None:
        super().__init__()
        backbone = getattr(segmenter, "backbone", None)
        if not hasattr(segmenter, "decode") or backbone is None or not hasattr(backbone, "config"):
            raise UserError("asg.enabled needs a ViT segmenter (model.name: vit_segmenter); "
                            f"{type(segmenter).__name__} has no ViT backbone")
        if backbone.config.pos != "none":
            raise UserError(f"asg.enabled replaces positional embeddings, but the backbone uses pos={backbone.config.pos}; "
                            "set model.options.pos=none (ASG is never combined with APE or RoPE)")
        self.segmenter = segmenter
        self.position_head = PositionHead(backbone.embed_dim)
        self.loss = config.loss

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits, final = self.segmenter.decode(images, final_tokens=True)
        patch = self.segmenter.backbone.config.patch_size
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        predicted = self.position_head(final).float()
        return logits, position_loss(predicted, grid, self.loss), position_error(predicted.detach(), grid)
