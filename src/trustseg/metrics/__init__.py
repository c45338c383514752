"""Streaming, mergeable segmentation metrics: feed every accumulator the same `Predictions` per batch."""

from trustseg.metrics.base import Accumulator, Predictions
from trustseg.metrics.boundary import BoundaryIoU, boundary_counts, boundary_width
from trustseg.metrics.calibration import CalibrationHistogram
from trustseg.metrics.confusion import (
    ConfusionMatrix,
    PerImageConfusion,
    PerImageIoU,
    confusion_matrix,
    metrics_from_confusion,
    per_image_iou,
)
from trustseg.metrics.uncertainty import UncertaintyHistogram, error_auroc, risk_coverage, uncertainty_bin_edges

__all__ = [
    "Accumulator",
    "BoundaryIoU",
    "CalibrationHistogram",
    "ConfusionMatrix",
    "PerImageConfusion",
    "PerImageIoU",
    "Predictions",
    "UncertaintyHistogram",
    "boundary_counts",
    "boundary_width",
    "confusion_matrix",
    "error_auroc",
    "metrics_from_confusion",
    "per_image_iou",
    "risk_coverage",
    "uncertainty_bin_edges",
]
