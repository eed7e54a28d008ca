"""torchmetrics ``Metric`` wrappers around the exact functional OOD metrics.

The metrics keep every score (float64) and its ID/OOD label in two ``cat`` states, so DDP
gathers all samples from all ranks before :meth:`compute` ranks them once; the result is the
same as on one process. torchmetrics' own ``BinaryAUROC``/``BinaryROC`` are not used because
they push out-of-[0, 1] inputs through a sigmoid (float32 energies above ~17 collapse to 1.0)
and bin on a [0, 1] grid when ``thresholds=`` is set; raw OOD scores must be ranked unchanged.
Memory is 9 bytes per sample, e.g. under 1 MB for CIFAR-10 test plus six OOD sets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_ood.metrics.functional import (
    METRIC_NAMES,
    FPRMethod,
    Positive,
    aupr_in,
    aupr_out,
    auroc,
    detection_accuracy,
    fpr_at_tpr,
    ood_metric_tensors,
)

__all__ = [
    "AUPR",
    "OODAUROC",
    "DetectionAccuracy",
    "FPRAtTPR",
    "OODMetrics",
    "OODScoreMetric",
]


class OODScoreMetric(Metric):
    """Base class: accumulates per-sample scores (higher = more ID) and ID/OOD labels.

    ``update(scores, is_id)`` takes a (B,) score tensor and either one bool for the whole batch
    (e.g. ``True`` for an ID loader, ``False`` for an OOD loader) or a (B,) bool/0-1 tensor.
    Subclasses implement :meth:`_compute` on the split ID and OOD scores.
    """

    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    scores: list[Tensor] | Tensor
    is_id: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_id", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, is_id: Tensor | bool) -> None:
        """Append a batch of scores with their ID (True) / OOD (False) labels."""
        if not isinstance(scores, Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 1:
            raise ValueError(
                f"scores must be 1-D with shape (B,), got shape {tuple(scores.shape)}; "
                "pass one score per sample"
            )
        if scores.is_complex():
            raise TypeError(f"scores must hold real numbers, got dtype {scores.dtype}")
        labels = self._labels(is_id, scores)
        # NaN/Inf are kept here and reported per set (ID/OOD) by compute(); never dropped.
        self.scores.append(scores.detach().to(torch.float64))
        self.is_id.append(labels)

    @staticmethod
    def _labels(is_id: Tensor | bool, scores: Tensor) -> Tensor:
        n = scores.shape[0]
        if isinstance(is_id, bool):
            return torch.full((n,), is_id, dtype=torch.bool, device=scores.device)
        if not isinstance(is_id, Tensor):
            raise TypeError(
                f"is_id must be a bool or a (B,) tensor of bool/0-1 labels, got "
                f"{type(is_id).__name__}"
            )
        if is_id.dim() == 0:
            is_id = is_id.expand(n)
        if tuple(is_id.shape) != (n,):
            raise ValueError(
                f"is_id must have the same shape as scores ({n},), got {tuple(is_id.shape)}"
            )
        if is_id.dtype != torch.bool:
            if is_id.is_floating_point() or is_id.is_complex():
                raise TypeError(f"is_id must be bool or integer 0/1, got dtype {is_id.dtype}")
            if bool(((is_id != 0) & (is_id != 1)).any()):
                raise ValueError("is_id must hold only 0 (OOD) and 1 (ID) values")
            is_id = is_id != 0
        return is_id.to(device=scores.device)

    def _split(self) -> tuple[Tensor, Tensor]:
        """All accumulated (and, under DDP, gathered) scores split into (ID, OOD)."""
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError(
                f"{type(self).__name__}.compute() called before update(): no scores; feed "
                "both ID and OOD batches first"
            )
        scores = dim_zero_cat(self.scores)
        is_id = dim_zero_cat(self.is_id).to(torch.bool)
        return scores[is_id], scores[~is_id]

    def compute(self) -> Any:
        """The metric over all samples seen since the last ``reset``."""
        return self._compute(*self._split())

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> Any:
        raise NotImplementedError


class OODMetrics(OODScoreMetric):
    """All of :data:`~lightning_ood.metrics.functional.METRIC_NAMES` in one metric.

    ``compute()`` returns ``{name: 0-d float64 tensor}``; FPRs are the exact ROC ones, ID
    positive except ``fpr95_oodpos`` (see ``METRIC_CONVENTIONS``).
    """

    # Mixed directions (FPRs lower-is-better, AUROC higher); per-metric classes say which.
    higher_is_better = None

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> dict[str, Tensor]:
        out = ood_metric_tensors(scores_id, scores_ood)
        return {k: out[k] for k in METRIC_NAMES}


class FPRAtTPR(OODScoreMetric):
    """FPR at ``tpr`` TPR; ``positive`` and ``method`` as in ``functional.fpr_at_tpr``."""

    higher_is_better = False

    def __init__(
        self,
        tpr: float = 0.95,
        positive: Positive = "id",
        method: FPRMethod = "roc",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1] (a fraction, e.g. 0.95), got {tpr}")
        if positive not in ("id", "ood"):
            raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
        if method not in ("roc", "reference"):
            raise ValueError(f"method must be 'roc' or 'reference', got {method!r}")
        self.tpr = float(tpr)
        self.positive = positive
        self.method = method

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> Tensor:
        return fpr_at_tpr(
            scores_id, scores_ood, self.tpr, positive=self.positive, method=self.method
        )


class OODAUROC(OODScoreMetric):
    """Exact AUROC, ID positive (ties 1/2)."""

    higher_is_better = True

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> Tensor:
        return auroc(scores_id, scores_ood)


class AUPR(OODScoreMetric):
    """Average precision; ``positive="id"`` is AUPR-In, ``"ood"`` AUPR-Out."""

    higher_is_better = True

    def __init__(self, positive: Positive = "id", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if positive not in ("id", "ood"):
            raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
        self.positive = positive

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> Tensor:
        fn = aupr_in if self.positive == "id" else aupr_out
        return fn(scores_id, scores_ood)


class DetectionAccuracy(OODScoreMetric):
    """max_t 0.5 * (TPR + TNR), the ODIN/Mahalanobis detection accuracy."""

    higher_is_better = True

    def _compute(self, scores_id: Tensor, scores_ood: Tensor) -> Tensor:
        return detection_accuracy(scores_id, scores_ood)
