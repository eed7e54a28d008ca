"""Lightning glue: fit detectors after training, score them during test, report."""

from lightning_ood.callbacks.ood import (
    OODEvaluation,
    StrategyReducer,
    calibrate_detectors,
    fit_detectors,
)
from lightning_ood.callbacks.predictions import PredictionCSVWriter

__all__ = [
    "OODEvaluation",
    "PredictionCSVWriter",
    "StrategyReducer",
    "calibrate_detectors",
    "fit_detectors",
]
