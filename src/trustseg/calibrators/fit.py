"""Fit calibrators by NLL on held-out data: pixel-wise ones on a pixel subsample, spatial ones on maps.

Memory is bounded by the subsample, not the data: each fit image contributes at most
ceil(max_pixels / images) uniformly drawn labelled pixels (K logits + label each). Spatial
calibrators (LTS, IBTS) need whole logit maps and images; they keep at most `max_maps` images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from trustseg.calibrators.methods import Calibrator, PixelCalibrator
from trustseg.data.base import SegmentationDataset
from trustseg.data.transforms import collate
from trustseg.errors import UserError
from trustseg.engine.progress import track


@dataclass
class FitData:
    """What the calibrators are fitted on: pixel rows for pixel-wise methods, maps for spatial ones."""

    logits: Tensor  # (N, K) float32, labelled pixels only
    labels: Tensor  # (N,) int64 in [0, K)
    maps: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (logits, image, mask)
    images: int = 0
    labelled_pixels: int = 0


def collect_fit_data(
    predictor,
    dataset: SegmentationDataset,
    *,
    max_pixels: int = 1_000_000,
    max_maps: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> FitData:
    """Run `predictor` over `dataset` once and keep a uniform labelled-pixel subsample (and maps)."""
    if len(dataset) == 0:
        raise UserError("the fit data is empty: calibrators need held-out labelled images")
    K, ignore = dataset.classes.num_classes, dataset.classes.ignore_index
    quota = math.ceil(max_pixels / len(dataset))
    generator = torch.Generator().manual_seed(seed)
    rows, labels, maps = [], [], []
    labelled = 0
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate)
    with torch.no_grad():  # not inference_mode: the kept logits feed autograd when fitting
        for batch in track(loader, total=len(loader), description="fit data", enabled=progress):
            mask = batch["mask"]
            if mask is None:
                raise UserError(f"fit image {batch['path'][0]} has no label map: calibration needs labels")
            logits = predictor(batch["image"])
            if not bool(torch.isfinite(logits).all()):
                raise UserError(f"the model's logits on fit image {batch['path'][0]} contain NaN or inf")
            valid = (mask != ignore).flatten()
            target = mask.flatten()
            if bool(((target < 0) | (target >= K))[valid].any()):
                raise UserError(f"fit image {batch['path'][0]} has labels outside [0, {K}) other than {ignore}")
            index = valid.nonzero().squeeze(1)
            labelled += index.numel()
            index = index[torch.randperm(index.numel(), generator=generator)[:quota]]
            rows.append(logits.permute(0, 2, 3, 1).reshape(-1, K)[index])
            labels.append(target[index].long())
            if len(maps) < max_maps and index.numel():
                maps.append((logits[0].clone(), batch["image"][0].clone(), mask[0].clone()))
    if labelled == 0:
        raise UserError("the fit data has no labelled pixels (every pixel is ignore_index)")
    return FitData(torch.cat(rows), torch.cat(labels), maps, len(dataset), labelled)


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
    lr: float = 5e-3,
    progress: bool = False,
) -> FitReport:
    """Minimise the NLL (+ the calibrator's regulariser). Pixel-wise: full-batch L-BFGS with a strong
    Wolfe line search on the pixel rows. Spatial: Adam over the maps, one image per step, `epochs`
    passes in a fixed order."""
    start = time.perf_counter()
    torch.manual_seed(0)
    if calibrator.spatial:
        if not data.maps:
            raise UserError(f"{calibrator.method} needs whole logit maps: collect the fit data with max_maps > 0")

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
