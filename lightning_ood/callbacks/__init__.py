"""Lightning glue: fit detectors after training, score them during test, report."""

from lightning_ood.callbacks.ood import OODEvaluation, StrategyReducer, fit_detectors

__all__ = ["OODEvaluation", "StrategyReducer", "fit_detectors"]
