"""Lightning glue: fit detectors after training, score them during test, report."""

from lightning_ood.callbacks.evaluation import (
    OODEvaluation,
    StrategyReducer,
    calibrate_with_trainer,
    fit_with_trainer,
)
from lightning_ood.callbacks.predictions import PredictionCSVWriter

__all__ = [
    "OODEvaluation",
    "PredictionCSVWriter",
    "StrategyReducer",
    "calibrate_with_trainer",
    "fit_with_trainer",
]
