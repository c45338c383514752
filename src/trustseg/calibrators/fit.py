"""Fit calibrators by NLL on held-out data: pixel-wise ones on a pixel sample, spatial ones on crops
of the logit maps with their images (both collected by `calibrators.fit_data`, in bounded memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trustseg.calibrators.fit_data import FitData
from trustseg.calibrators.methods import Calibrator, PixelCalibrator
from trustseg.errors import UserError
from trustseg.engine.progress import track


@dataclass
class FitReport:
    seconds: float
    nll_before: float
    nll_after: float
    pixels: int
    images: int


def _nll(calibrator: PixelCalibrator, data: FitData) -> Tensor:
    return F.cross_entropy(calibrator.transform(data.logits), data.labels)


def _map_nll(calibrator: Calibrator, logits: Tensor, image: Tensor, mask: Tensor, ignore: int) -> Tensor:
    calibrated = calibrator(logits[None], image[None])
    return F.cross_entropy(calibrated, mask[None].long(), ignore_index=ignore)


def fit_calibrator(
    calibrator: Calibrator,
    data: FitData,
    *,
    ignore_index: int = 255,
    epochs: int = 20,
    lr: float = 1e-4,
    progress: bool = False,
) -> FitReport:
    """Minimise the NLL (+ the calibrator's regulariser). Pixel-wise: full-batch L-BFGS with a strong
    Wolfe line search on the pixel rows. Spatial: Adam over the crops, one crop per step, `epochs`
    passes in a fixed order, at learning rate `lr`: Ding et al.'s 1e-4 (LTS, ICCV 2021). A larger rate
    moves every weight of LTS's convolutions on raw logits by about lr per step, which shifts log T by
    about lr x fan-in x |logit|: at 5e-3 the fit ended noisier and worse (benchmarks/RESULTS.md)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    if calibrator.spatial:
        if not data.maps:
            raise UserError(f"{calibrator.method} needs logit-map crops: collect the fit data with max_crops > 0")

        def mean_nll() -> float:
            with torch.no_grad():
                return sum(float(_map_nll(calibrator, *m, ignore_index)) for m in data.maps) / len(data.maps)

        before = mean_nll()
        optimizer = torch.optim.Adam(calibrator.parameters(), lr=lr)
        steps = [m for _ in range(epochs) for m in data.maps]
        for logits, image, mask in track(steps, total=len(steps), description=f"fit {calibrator.method}",
                                         enabled=progress):
            optimizer.zero_grad()
            loss = _map_nll(calibrator, logits, image, mask, ignore_index) + calibrator.regularization()
            loss.backward()
            optimizer.step()
        after = mean_nll()
    else:
        with torch.no_grad():
            before = float(_nll(calibrator, data))
        optimizer = torch.optim.LBFGS(calibrator.parameters(), lr=1, max_iter=200, tolerance_grad=1e-7,
                                      tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = _nll(calibrator, data) + calibrator.regularization()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            after = float(_nll(calibrator, data))
    if not math.isfinite(after):
        raise UserError(f"fitting {calibrator.method} diverged (NLL {after}); check the fit data's logits")
    calibrator.eval().requires_grad_(False)
    return FitReport(time.perf_counter() - start, before, after, int(data.labels.numel()), data.images)
