"""OOD evaluation metrics: exact functional core and torchmetrics ``Metric`` wrappers."""

from lightning_ood.metrics.functional import (
    METRIC_CONVENTIONS,
    METRIC_NAMES,
    aupr_in,
    aupr_out,
    auroc,
    detection_accuracy,
    fpr_at_tpr,
    ood_metric_tensors,
    ood_metrics,
    roc_counts,
    roc_curve,
)
from lightning_ood.metrics.ood import (
    AUPR,
    OODAUROC,
    DetectionAccuracy,
    FPRAtTPR,
    OODMetrics,
    OODScoreMetric,
)

__all__ = [
    "AUPR",
    "METRIC_CONVENTIONS",
    "METRIC_NAMES",
    "OODAUROC",
    "DetectionAccuracy",
    "FPRAtTPR",
    "OODMetrics",
    "OODScoreMetric",
    "aupr_in",
    "aupr_out",
    "auroc",
    "detection_accuracy",
    "fpr_at_tpr",
    "ood_metric_tensors",
    "ood_metrics",
    "roc_counts",
    "roc_curve",
]
