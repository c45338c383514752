"""Post-hoc calibration: calibrators, their fitting, and the measured properties of each."""

from trustseg.calibrators.methods import METHODS, Calibrator, build_calibrator
from trustseg.calibrators.fit import FitReport, fit_calibrator
from trustseg.calibrators.fit_data import FitData, FitDataCollector, collect_fit_data

__all__ = ["METHODS", "Calibrator", "FitData", "FitDataCollector", "FitReport", "build_calibrator", "collect_fit_data", "fit_calibrator"]
