"""torchmetrics ``Metric`` wrappers around the exact functional OOD metrics.

The metrics keep every score (float64) and its ID/OOD label in two ``cat`` states, so DDP
gathers all samples from all ranks before :meth:`compute` ranks them once; the result is the
same as on one process. torchmetrics' own ``BinaryAUROC``/``BinaryROC`` are not used because
they push out-of-[0, 1] inputs through a sigmoid (float32 energies above ~17 collapse to 1.0)
and bin on a [0, 1] grid when ``thresholds=`` is set; raw OOD scores must be ranked unchanged.
Memory is 9 bytes per sample, e.g. under 1 MB for CIFAR-10 test plus six OOD sets; the CCR
metrics keep one more ``cat`` state, each ID sample's correctness (prediction == label).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_ood.metrics.functional import (
    CCR_FPRS,
    METRIC_NAMES,
    CCRMethod,
    FPRMethod,
    Positive,
    aupr_in,
    aupr_out,
    auroc,
    ccr_metric_tensors,
    ccr_name,
    detection_accuracy,
    fpr_at_tpr,
    ood_metric_tensors,
)

__all__ = [
    "AUPR",
    "OODAUROC",
    "CCRAtFPR",
    "CCRMetrics",
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


class _CCRMetric(OODScoreMetric):
    """Accumulates scores, ID/OOD labels and each ID sample's correctness for CCR@FPR.

    ``update(scores, is_id, correct)``: ``correct`` is a (B,) bool/0-1 tensor, ``prediction
    == label`` of each sample; it is required when the batch holds ID samples and ignored
    (may be None) for OOD samples, which have no label. All three states are ``cat`` states,
    so under DDP ``compute()`` sees every sample of every rank, as one process would.
    """

    higher_is_better = True

    correct: list[Tensor] | Tensor

    def __init__(self, fprs: Sequence[float], method: CCRMethod, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if method not in ("roc", "openood"):
            raise ValueError(f"method must be 'roc' or 'openood', got {method!r}")
        self.fprs = tuple(float(t) for t in fprs)
        names = [ccr_name(t) for t in self.fprs]  # refuses rates outside (0, 1]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"fprs must be one or more distinct rates, got {list(fprs)}")
        self.method: CCRMethod = method
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(  # type: ignore[override]
        self, scores: Tensor, is_id: Tensor | bool, correct: Tensor | None = None
    ) -> None:
        """Append a batch of scores, ID/OOD labels and (for ID samples) correctness."""
        if not isinstance(scores, Tensor):
            super().update(scores, is_id)  # raises the base class's TypeError
        labels = self._labels(is_id, scores)
        ok = self._correct(correct, labels, scores.shape[0])
        super().update(scores, labels)
        self.correct.append(ok)

    @staticmethod
    def _correct(correct: Tensor | None, labels: Tensor, n: int) -> Tensor:
        if correct is None:
            if bool(labels.any()):
                raise ValueError(
                    "CCR needs `correct` (prediction == label, a (B,) bool tensor) for every "
                    f"batch holding ID samples; this batch holds {int(labels.sum())} ID samples"
                )
            return torch.zeros(n, dtype=torch.bool, device=labels.device)
        if not isinstance(correct, Tensor):
            raise TypeError(
                f"correct must be a (B,) bool/0-1 tensor (prediction == label), got "
                f"{type(correct).__name__}"
            )
        if tuple(correct.shape) != (n,):
            raise ValueError(
                f"correct must have the same shape as scores ({n},), got {tuple(correct.shape)}"
            )
        if correct.dtype != torch.bool:
            if correct.is_floating_point() or correct.is_complex():
                raise TypeError(f"correct must be bool or integer 0/1, got dtype {correct.dtype}")
            if bool(((correct != 0) & (correct != 1)).any()):
                raise ValueError(
                    "correct must hold only 0/1 (prediction == label), not class labels"
                )
            correct = correct != 0
        # OOD samples have no label: their entry is stored False and never read.
        return correct.detach().to(labels.device) & labels

    def compute(self) -> Any:
        """CCR over all samples seen since the last ``reset`` (gathered over ranks)."""
        scores_id, scores_ood = self._split()
        is_id = dim_zero_cat(self.is_id).to(torch.bool)
        correct_id = dim_zero_cat(self.correct).to(torch.bool)[is_id]
        return self._ccr(
            ccr_metric_tensors(scores_id, scores_ood, correct_id, self.fprs, method=self.method)
        )

    def _ccr(self, values: dict[str, Tensor]) -> Any:
        raise NotImplementedError


class CCRAtFPR(_CCRMetric):
    """CCR at one FPR (0-d float64 tensor); ``fpr`` and ``method`` as in
    ``functional.ccr_at_fpr`` (``"roc"``: best CCR with FPR <= fpr; ``"openood"``: OpenOOD's
    ``ccr_fpr`` literally)."""

    def __init__(self, fpr: float = 1e-4, method: CCRMethod = "roc", **kwargs: Any) -> None:
        super().__init__((fpr,), method, **kwargs)

    def _ccr(self, values: dict[str, Tensor]) -> Tensor:
        return values[ccr_name(self.fprs[0])]


class CCRMetrics(_CCRMetric):
    """CCR at every rate of ``fprs`` (default 1e-4 ... 1e-1, OpenOOD's): ``compute()`` returns
    ``{ccr_name(fpr): 0-d float64 tensor}`` (``CCR_NAMES`` for the default rates)."""

    def __init__(
        self, fprs: Sequence[float] = CCR_FPRS, method: CCRMethod = "roc", **kwargs: Any
    ) -> None:
        super().__init__(fprs, method, **kwargs)

    def _ccr(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        return values
