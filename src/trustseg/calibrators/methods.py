"""Post-hoc calibrators: logits (B, K, H, W) [+ images] -> calibrated logits, fitted on held-out data.

Each calibrator states three properties, and `calibrators.properties` checks them numerically:

- **translation invariance (TI)**, g(z + c 1) = g(z): softmax cannot tell z from z + c 1, so neither
  should a calibrator (Kirscher et al., "Rethinking Post-Hoc Calibration in Semantic Segmentation",
  2026). TS and Dirichlet are TI; vector/matrix scaling and LTS read the raw logit offset and are not.
  Their TI counterparts (``*_ti``) read the centred logits z - mean_k(z_k) instead, which isolates
  the effect of the representation.
- **argmax preservation** (the segmentation map is unchanged) and **order preservation** (every
  class ranking is unchanged). On an affine softmax calibrator softmax(Wz + b) these constraints
  leave only temperature scaling (same paper), so `ClassConditionalAffine` indexes its parameters by
  the predicted class instead: more expressive than TS, and still order-preserving.

Pixel-wise calibrators implement `transform` on (N, K) logit rows and are fitted on a pixel subsample;
spatial ones (LTS, IBTS) need whole logit maps and the image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustseg.errors import UserError

REPRESENTATIONS = ("raw", "centred", "logprob")


def represent(z: Tensor, kind: str, dim: int = 1) -> Tensor:
    """The calibrator's input: raw logits, centred logits z - mean(z) (TI), or log-softmax (TI)."""
    if kind == "raw":
        return z
    if kind == "centred":
        return z - z.mean(dim, keepdim=True)
    if kind == "logprob":
        return z.log_softmax(dim)
    raise ValueError(f"unknown representation {kind!r}: expected one of {REPRESENTATIONS}")


class Calibrator(nn.Module):
    """Base: `forward(logits, images)` maps (B, K, H, W) logits to calibrated logits of the same shape.

    Subclasses set the class attributes below (checked by tests, reported in calibration.json).
    """

    spatial = False  # True: fitted on whole maps with images (LTS); False: on pixel rows
    translation_invariant = False
    argmax_preserving = False
    order_preserving = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def regularization(self) -> Tensor:
        """Penalty added to the fitting NLL (0 unless the method is regularised)."""
        return torch.zeros(())

    def summary(self) -> dict[str, float]:
        """A few readable numbers about the fitted parameters, for calibration.json."""
        return {}


class PixelCalibrator(Calibrator, ABC):
    """A calibrator that maps each pixel's logit vector on its own: `transform` on (N, K) rows."""

    @abstractmethod
    def transform(self, z: Tensor) -> Tensor:
        """(N, K) logits -> (N, K) calibrated logits."""

    def forward(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        B, K, H, W = logits.shape
        rows = logits.permute(0, 2, 3, 1).reshape(-1, K)
        return self.transform(rows).reshape(B, H, W, K).permute(0, 3, 1, 2)


class TemperatureScaling(PixelCalibrator):
    """z / T with one T > 0 (Guo et al., ICML 2017)."""

    translation_invariant = argmax_preserving = order_preserving = True

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def transform(self, z: Tensor) -> Tensor:
        return z * torch.exp(-self.log_temperature)

    def summary(self) -> dict[str, float]:
        return {"temperature": float(self.log_temperature.exp())}


class VectorScaling(PixelCalibrator):
    """w * r(z) + b per class (Guo et al. 2017); r = raw (not TI) or centred (the TI counterpart)."""

    def __init__(self, num_classes: int, representation: str = "raw") -> None:
        super().__init__(num_classes)
        self.representation = representation
        self.translation_invariant = representation != "raw"
        self.weight = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def transform(self, z: Tensor) -> Tensor:
        return represent(z, self.representation) * self.weight + self.bias


class MatrixScaling(PixelCalibrator):
    """W r(z) + b with ODIR, the off-diagonal and intercept regulariser of Kull et al. (NeurIPS 2019):
    lambda_w / (K (K-1)) sum_{i != j} W_ij^2 + lambda_b / K sum_j b_j^2.

    r = log-softmax is Dirichlet calibration (Kull et al.), TI; r = raw is matrix scaling, not TI;
    r = centred is its TI counterpart. Kull et al. pick the lambdas by cross-validation; the default
    1e-3 is a light penalty for the ~1e6 pixel rows a segmentation fit uses.
    """

    def __init__(self, num_classes: int, representation: str = "raw", odir: float = 1e-3) -> None:
        super().__init__(num_classes)
        self.representation, self.odir = representation, odir
        self.translation_invariant = representation != "raw"
        self.weight = nn.Parameter(torch.eye(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def transform(self, z: Tensor) -> Tensor:
        return F.linear(represent(z, self.representation), self.weight, self.bias)

    def regularization(self) -> Tensor:
        K = self.num_classes
        off_diagonal = self.weight - torch.diag(torch.diagonal(self.weight))
        return self.odir * (off_diagonal.square().sum() / max(K * (K - 1), 1) + self.bias.square().mean())


class ClassConditionalAffine(PixelCalibrator):
    """Affine maps of the logit gaps d_j = z_k - z_j >= 0 to the predicted class k = argmax z.

    Calibrated logits: 0 for k, and -(w_kj d_j + c_kj) for j != k, with w > 0 and c >= 0, so every
    other class stays below k: argmax-preserving, and TI because gaps ignore a shift. The parameters
    are indexed by the predicted class, which keeps it more expressive than TS (on which argmax- or
    order-preserving affine softmax calibrators collapse, Kirscher et al. 2026):

    - `order_preserving=True`: one scale and one bonus per predicted class (w_kj = w_k, c_kj = c_k),
      i.e. a_k z + b_k e_k up to a shift: a temperature per predicted class and a non-negative bonus
      for it, so the confidence is an affine, not linear, function of the margins; a common scale
      keeps every order.
    - `order_preserving=False`: a scale and bonus per (predicted, other) class pair: only the argmax
      is kept, the ranking of the other classes may change. Its K^2 scales are shrunk towards their
      common value (`shrink` times the variance of log w), since pairs seldom seen in the fit data
      otherwise drift to extreme temperatures (on CamVid, unregularised: 1.7e-5 to 6.9e3).
    """

    translation_invariant = argmax_preserving = True

    def __init__(self, num_classes: int, order_preserving: bool = True, shrink: float = 1e-2) -> None:
        super().__init__(num_classes)
        self.order_preserving = order_preserving
        self.shrink = 0.0 if order_preserving else shrink
        shape = (num_classes, 1 if order_preserving else num_classes)
        self.log_scale = nn.Parameter(torch.zeros(shape))
        # softplus(-10) = 4.5e-5: starts at (almost) the identity, gradient alive
        self.raw_bonus = nn.Parameter(torch.full(shape, -10.0))

    def transform(self, z: Tensor) -> Tensor:
        top_logit, top = z.max(1, keepdim=True)
        others = 1 - F.one_hot(top[:, 0], self.num_classes).to(z.dtype)
        scale = self.log_scale.exp()[top[:, 0]]
        bonus = F.softplus(self.raw_bonus)[top[:, 0]]
        return -(scale * (top_logit - z) + bonus * others)

    def regularization(self) -> Tensor:
        return self.shrink * (self.log_scale - self.log_scale.mean()).square().mean()

    def summary(self) -> dict[str, float]:
        temperatures = (-self.log_scale).exp()
        return {"temperature_min": float(temperatures.min()), "temperature_max": float(temperatures.max())}


def _temperature_conv(channels: int, branches: int) -> nn.Conv2d:
    """LTS branches: channels -> one map each, 5x5 dilated by 2 (a 9x9 field), reflect padding, zero init."""
    conv = nn.Conv2d(channels, branches, kernel_size=5, dilation=2, padding=4, padding_mode="reflect")
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LocalTemperatureScaling(Calibrator):
    """z / T(x): a per-pixel temperature from a small CNN on the logit map and the image.

    Local Temperature Scaling (Ding, Han, Liu, Niethammer, ICCV 2021): four temperature branches on
    the logits mixed by a binary tree of three sigmoid gates, then mixed with an image branch by one
    more gate. The paper's T = relu(1 + mix) + 1e-8 collapses to T = 1e-8 (logits x 1e8) wherever a
    step pushes mix below -1; we use T = exp(mix), smooth and positive. All convolutions start at
    zero, so T starts at 1 (the identity). `per_image` averages log T over each image: image-based
    TS (IBTS, same paper).

    A positive per-pixel temperature keeps every order (argmax- and order-preserving). The branches
    read r(z): raw logits (as published, not TI) or centred logits (the TI counterpart).
    """

    spatial = True
    argmax_preserving = order_preserving = True

    def __init__(self, num_classes: int, representation: str = "raw", per_image: bool = False) -> None:
        super().__init__(num_classes)
        self.representation, self.per_image = representation, per_image
        self.translation_invariant = representation != "raw"
        self.logit_branches = _temperature_conv(num_classes, 8)  # 4 temperatures, then 4 gates
        self.image_temperature = _temperature_conv(3, 1)

    def temperature(self, logits: Tensor, images: Tensor) -> Tensor:
        """(B, 1, H, W) temperatures (B, 1, 1, 1 with `per_image`)."""
        branches = self.logit_branches(represent(logits, self.representation))
        t1, t2, t3, t4 = branches[:, :4].split(1, dim=1)
        g12, g34, g_tree, g_image = torch.sigmoid(branches[:, 4:]).split(1, dim=1)
        tree = g_tree * (g12 * t1 + (1 - g12) * t2) + (1 - g_tree) * (g34 * t3 + (1 - g34) * t4)
        mix = g_image * tree + (1 - g_image) * self.image_temperature(images.to(logits.dtype) / 255)
        return torch.exp(mix.mean((2, 3), keepdim=True) if self.per_image else mix)

    def forward(self, logits: Tensor, images: Tensor | None = None) -> Tensor:
        if images is None:
            raise ValueError("local temperature scaling needs the images")
        return logits / self.temperature(logits, images)


# name -> (factory(num_classes), one-line description). `*_ti` are the TI counterparts.
METHODS: dict[str, tuple[type[Calibrator], dict, str]] = {
    "ts": (TemperatureScaling, {}, "temperature scaling"),
    "vs": (VectorScaling, {"representation": "raw"}, "vector scaling"),
    "vs_ti": (VectorScaling, {"representation": "centred"}, "vector scaling on centred logits"),
    "ms": (MatrixScaling, {"representation": "raw"}, "matrix scaling with ODIR"),
    "ms_ti": (MatrixScaling, {"representation": "centred"}, "matrix scaling with ODIR on centred logits"),
    "dirichlet": (MatrixScaling, {"representation": "logprob"}, "Dirichlet calibration with ODIR"),
    "ccaffine": (ClassConditionalAffine, {}, "class-conditional affine, order-preserving"),
    "ccaffine_argmax": (ClassConditionalAffine, {"order_preserving": False},
                        "class-conditional affine, argmax-preserving"),
    "lts": (LocalTemperatureScaling, {"representation": "raw"}, "local temperature scaling"),
    "lts_ti": (LocalTemperatureScaling, {"representation": "centred"}, "LTS on centred logits"),
    "ibts": (LocalTemperatureScaling, {"representation": "raw", "per_image": True}, "image-based TS"),
    "ibts_ti": (LocalTemperatureScaling, {"representation": "centred", "per_image": True},
                "image-based TS on centred logits"),
}


def build_calibrator(method: str, num_classes: int) -> Calibrator:
    """A fresh (identity-initialised) calibrator of `method` (a key of `METHODS`)."""
    if method not in METHODS:
        raise UserError(f"unknown calibration method {method!r}: expected one of {', '.join(METHODS)}")
    cls, options, _ = METHODS[method]
    calibrator = cls(num_classes, **options)
    calibrator.method = method
    return calibrator
