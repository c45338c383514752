"""Post-hoc calibration: calibrators, their fitting, and the measured properties of each."""

from trustseg.calibrators.methods import METHODS, Calibrator, build_calibrator
from trustseg.calibrators.fit import FitData, FitReport, collect_fit_data, fit_calibrator

__all__ = ["METHODS", "Calibrator", "FitData", "FitReport", "build_calibrator", "collect_fit_data", "fit_calibrator"]
