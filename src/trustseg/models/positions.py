"""Where a ViT's patch tokens lie, and how well tokens know it: the (row, col) of each token of a patch
grid, the distance between predicted and true positions in patches, and a linear probe that reads
positions from frozen tokens (a model without positional information cannot beat predicting the
grid's centre; Active Spatial Guidance, Liu et al. 2026, claims to teach it)."""

from __future__ import annotations

import torch
from torch import Tensor


def grid_positions(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(h*w, 2) positions (r / (h - 1), c / (w - 1)) in row-major token order; a grid one patch high or
    wide has all its rows (columns) at 0."""
    h, w = grid
    rows = torch.arange(h, device=device, dtype=torch.float32) / max(h - 1, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32) / max(w - 1, 1)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def patch_units(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """The factors (h - 1, w - 1) that turn grid_positions into patches (1 for a one-patch side)."""
    return torch.tensor([max(grid[0] - 1, 1), max(grid[1] - 1, 1)], device=device, dtype=torch.float32)


def position_error(predicted: Tensor, grid: tuple[int, int]) -> Tensor:
    """Mean Euclidean distance between predicted (..., h*w, 2) and true token positions, in patches."""
    target = grid_positions(grid, predicted.device)
    return ((predicted.float() - target) * patch_units(grid, predicted.device)).norm(dim=-1).mean()


def probe_positions(fit: list[tuple[Tensor, tuple[int, int]]], test: list[tuple[Tensor, tuple[int, int]]],
                    ridge: float = 1e-3) -> dict[str, float]:
    """Fit a linear map (ridge least squares, with bias) from tokens (h*w, D) to their (row, col) in
    patches on the `fit` images; on the `test` images, the mean distance in patches between probed and
    true positions, and that of always answering the mean fit position (what no knowledge gives)."""
    def stack(items):
        tokens = torch.cat([t.double() for t, _ in items])
        targets = torch.cat([(grid_positions(g) * patch_units(g)).double() for _, g in items])
        return torch.cat([tokens, torch.ones(len(tokens), 1, dtype=torch.float64)], dim=1), targets

    x, y = stack(fit)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    weights = torch.linalg.solve(gram, x.T @ y)
    x_test, y_test = stack(test)
    return {"error_patches": float((x_test @ weights - y_test).norm(dim=1).mean()),
            "centre_error_patches": float((y.mean(0) - y_test).norm(dim=1).mean()),
            "fit_tokens": len(x), "test_tokens": len(x_test)}
