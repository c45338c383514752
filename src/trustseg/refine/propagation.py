"""Image-guided label propagation (PAMR) that re-decides only the uncertain pixels: pure tensor functions.

PAMR (Araslanov & Roth, "Single-Stage Semantic Segmentation from Image Labels", CVPR 2020): every pixel i
looks at the 8 neighbours j of a 3x3 stencil at each dilation d (centre excluded; default dilations
1, 2, 4, 8, 12, 24, so 48 neighbours, image borders replicated). Its affinity to j is

    kappa_c(i, j) = -|I_c(i) - I_c(j)| / (1e-8 + 0.1 * sigma_c(i)),

sigma_c(i) the standard deviation of channel c over all 3x3 stencils at all dilations (centre included,
9 samples per dilation), averaged over channels, then a softmax over the neighbours gives alpha(i, j).
With several guides (the image and the model's features), kappa is the mean of the guides' kappas, so
each guide weighs the same whatever its number of channels. Propagation replaces each probability vector
by the alpha-weighted mean of its neighbours' vectors,
`iterations` times; alpha is fixed. Because alpha(i, .) sums to 1, the result stays a probability vector.

PAMR updates every pixel. Here the confident pixels are reset to their original probabilities after every
iteration, so they never change and they act as fixed boundary conditions from which the uncertain
pixels are re-decided (our design, in the spirit of uncertainty-guided test-time refinement).

Memory: nothing of size K x P x H x W is formed (P = 8 x number of dilations). Propagation shifts and
accumulates, one neighbour at a time, so it holds about 4 (B, K, H, W) maps (original, current, next and
the padded current one). The affinity (B, P, rows, W) is computed for `tile_rows` image rows at a time:
with one tile (tile_rows >= H) it is computed once, with several it is recomputed for each tile in each
iteration, so peak memory is B x (4 K H W + (2 P + 6) x tile_rows x W) floats (P once with a single guide),
plus the padded guides.
Both give the same result (up to float rounding of identical operations on differently sized tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Araslanov & Roth's PAMR defaults (1-stage-wseg, core/config.py: PAMR_KERNEL, PAMR_ITER)
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)
PAMR_ITERATIONS = 10
_STD_SCALE = 0.1  # kappa divides |dI| by 0.1 * local std (PAMR)
_STD_EPS = 1e-8


def neighbour_offsets(dilations: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of the 8 neighbours of a 3x3 stencil at each dilation, centre excluded: P = 8 x len(dilations)."""
    return tuple((d * dy, d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def _window(padded: Tensor, pad: int, rows: tuple[int, int], dy: int, dx: int, width: int) -> Tensor:
    """Rows [r0, r1) of the unpadded map shifted by (dy, dx): values at (y + dy, x + dx), clamped to the
    map (the map was replicate-padded by `pad`)."""
    r0, r1 = rows
    return padded[:, :, pad + r0 + dy:pad + r1 + dy, pad + dx:pad + dx + width]


def guide_kappa(padded_guide: Tensor, pad: int, rows: tuple[int, int], width: int,
                dilations: tuple[int, ...]) -> Tensor:
    """PAMR's kappa (B, P, r1 - r0, W) of one guide for the pixels in rows [r0, r1): the mean over its
    channels of -|dI_c| / (1e-8 + 0.1 sigma_c), ordered as `neighbour_offsets(dilations)`."""
    centre = _window(padded_guide, pad, rows, 0, 0, width)
    # the std over every 3x3 stencil at every dilation, centre included (9 x len(dilations) samples)
    stencil = [(d * dy, d * dx) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    mean = sum(_window(padded_guide, pad, rows, dy, dx, width) for dy, dx in stencil) / len(stencil)
    squares = sum((_window(padded_guide, pad, rows, dy, dx, width) - mean).square() for dy, dx in stencil)
    std = (squares / (len(stencil) - 1)).sqrt()  # unbiased, as torch.std in the reference
    scale = _STD_EPS + _STD_SCALE * std
    offsets = neighbour_offsets(dilations)
    kappa = centre.new_empty(centre.shape[0], len(offsets), *centre.shape[2:])
    for j, (dy, dx) in enumerate(offsets):
        kappa[:, j] = (-(_window(padded_guide, pad, rows, dy, dx, width) - centre).abs() / scale).mean(1)
    return kappa


def local_affinity(padded_guides: Sequence[Tensor], pad: int, rows: tuple[int, int], width: int,
                   dilations: tuple[int, ...]) -> Tensor:
    """PAMR affinities of the pixels in rows [r0, r1): (B, P, r1 - r0, W), each pixel's P weights >= 0
    summing to 1, ordered as `neighbour_offsets(dilations)`.

    Each of `padded_guides` is a guide (B, C, H, W) replicate-padded by `pad` >= max(dilations) on every
    side (the image, or any feature map: the affinity does not change under a per-channel affine map of
    it); their kappas are averaged.
    """
    kappa = guide_kappa(padded_guides[0], pad, rows, width, dilations)
    for guide in padded_guides[1:]:
        kappa += guide_kappa(guide, pad, rows, width, dilations)
    kappa /= len(padded_guides)
    # softmax over the neighbours, in place so that only one (B, P, rows, W) tensor is held
    kappa -= kappa.amax(dim=1, keepdim=True)
    kappa.exp_()
    return kappa.div_(kappa.sum(dim=1, keepdim=True))


def uncertain_pixels(probabilities: Tensor, percent: float) -> Tensor:
    """(B, H, W) bool: in each image, the `percent` % of pixels with the lowest top-class probability
    (at least ceil(percent / 100 x H x W) of them; ties at the threshold are all included)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent {percent}: expected a share of pixels in (0, 100]")
    confidence = probabilities.amax(dim=1).flatten(1)  # (B, HW)
    count = max(1, min(confidence.shape[1], int(-(-percent * confidence.shape[1] // 100))))
    threshold = confidence.kthvalue(count, dim=1, keepdim=True).values
    return (confidence <= threshold).view(probabilities.shape[0], *probabilities.shape[2:])


def refine_probabilities(probabilities: Tensor, guides: Tensor | Sequence[Tensor], uncertain: Tensor, *,
                         iterations: int = PAMR_ITERATIONS, dilations: tuple[int, ...] = PAMR_DILATIONS,
                         tile_rows: int | None = None) -> Tensor:
    """Propagate probabilities (B, K, H, W) over the guide's affinities, `iterations` times, changing only
    the pixels where `uncertain` (B, H, W) is True; every other pixel keeps exactly its input value.

    `guides` is one guide (B, C, H, W) at the same resolution, e.g. the image, or several, e.g. the image
    and the model's features. `tile_rows` bounds the affinity held at once (None: all rows, computed once);
    see the module docstring for the memory bound.
    """
    B, K, H, W = probabilities.shape
    guides = [guides] if isinstance(guides, Tensor) else list(guides)
    for guide in guides:
        if guide.shape[0] != B or guide.shape[-2:] != (H, W):
            raise ValueError(f"guide {tuple(guide.shape)} does not match probabilities {tuple(probabilities.shape)}")
    pad = max(dilations)
    padded_guides = [F.pad(g.to(probabilities.dtype), (pad, pad, pad, pad), mode="replicate") for g in guides]
    step = H if tile_rows is None else max(1, min(tile_rows, H))
    tiles = [(r0, min(r0 + step, H)) for r0 in range(0, H, step)]
    cached = [local_affinity(padded_guides, pad, tiles[0], W, dilations)] if len(tiles) == 1 else None
    offsets = neighbour_offsets(dilations)
    keep = ~uncertain[:, None]  # (B, 1, H, W)
    current = probabilities
    for _ in range(iterations):
        padded = F.pad(current, (pad, pad, pad, pad), mode="replicate")
        following = torch.empty_like(current)
        for number, rows in enumerate(tiles):
            affinity = cached[number] if cached else local_affinity(padded_guides, pad, rows, W, dilations)
            total = torch.zeros(B, K, rows[1] - rows[0], W, dtype=current.dtype, device=current.device)
            for j, (dy, dx) in enumerate(offsets):
                total.addcmul_(affinity[:, j:j + 1], _window(padded, pad, rows, dy, dx, W))
            following[:, :, rows[0]:rows[1]] = total
        current = torch.where(keep, probabilities, following)
    return current
