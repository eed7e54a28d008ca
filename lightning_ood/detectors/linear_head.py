"""Shared parts of the detectors that rescore penultimate features with a copy of the head.

:class:`LinearHeadDetector` copies the classifier (W, b) into buffers at ``finalize``, so
scoring needs features only; :class:`ActivationSampler` finds the exact percentile of training
activations that ReAct and DICE+ReAct clip at.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, Reducer
from lightning_ood.detectors.hparams import HParam, integer, optional, percent, positive
from lightning_ood.detectors.quantile import StreamingPercentile
from lightning_ood.models.base import BackboneOutput, OODBackbone
from lightning_ood.models.wrap import linear_classifier


class LinearHeadDetector(Detector):
    """Detectors that recompute logits from features with a copy of the head (W, b)."""

    requires_fit = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("weight", torch.zeros(0))  # W, (L, q)
        self.register_buffer("bias", torch.zeros(0))  # b, (L,)

    def _copy_head(self, model: OODBackbone) -> None:
        clf = linear_classifier(model, type(self).__name__)
        self.weight = clf.weight.detach().clone()
        self.bias = (
            clf.bias.detach().clone()
            if clf.bias is not None
            else self.weight.new_zeros(self.weight.shape[0])
        )

    def _check_features(self, h: Tensor) -> Tensor:
        self.check_fitted()
        if h.dim() != 2 or h.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"{type(self).__name__}.score: features must have shape (B, "
                f"{self.weight.shape[1]}), got {tuple(h.shape)}; was the detector fitted on "
                "another backbone?"
            )
        return h.to(self.weight.dtype)


class MeanHeadDetector(LinearHeadDetector):
    """Linear-head detectors that also need the training feature mean μ (B, q) -> (q,).

    :meth:`update` adds each batch's feature sum (float64) and count; :meth:`finalize`
    all-reduces both across DDP ranks (``reducer.sum``), stores ``feature_mean = Σh / n`` in
    the head's dtype and copies the head. The mean is over the whole training set, labels
    ignored (DICE's ā, NCI's global centre μ_G, fDBD's μ_train).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("feature_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("feature_mean", torch.zeros(0))  # μ, (q,)

    def reset(self) -> None:
        self.feature_sum = self.feature_sum.new_zeros(0)
        self.count = self.count.new_zeros(())
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        h = out.features.detach()
        if self.feature_sum.numel() == 0:
            self.feature_sum = torch.zeros(h.shape[1], dtype=torch.float64, device=h.device)
        # widen, then sum: bit-identical to ``sum(dim=0, dtype=float64)``, several times faster
        self.feature_sum += h.double().sum(dim=0)
        self.count += h.shape[0]

    def _finalize_mean(self, model: OODBackbone, reducer: Reducer | None) -> None:
        """Copy the head and derive ``feature_mean`` from the all-rank sums; drops the sums."""
        reducer = reducer or Reducer()
        self._copy_head(model)
        q = self.weight.shape[1]
        if self.feature_sum.numel() == 0 and float(self.count) > 0:
            raise RuntimeError(
                f"{type(self).__name__}.finalize: the training sums were already consumed by "
                "an earlier finalize(); call reset() and update() again before finalizing"
            )
        if self.feature_sum.numel() == 0:  # a rank that saw no batch still joins the reduction
            self.feature_sum = torch.zeros(q, dtype=torch.float64, device=self.weight.device)
        total = reducer.sum(self.feature_sum.clone())
        count = reducer.sum(self.count.clone())
        if float(count) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.finalize: no training sample was seen; run update() on "
                "the training set first"
            )
        if total.shape != (q,):
            raise ValueError(
                f"{type(self).__name__}.finalize: the training features have {total.shape[0]} "
                f"dimensions but the head expects {q}"
            )
        self.feature_mean = (total / count).to(self.weight)
        self.feature_sum = self.feature_sum.new_zeros(0)  # not needed to score
        self.count = count  # training samples over all ranks, kept for the record

    def _centred(self, h: Tensor) -> Tensor:
        return h - self.feature_mean


#: ReAct's clip threshold and its estimate (ReAct and DICE+ReAct declare these same three):
#: a fixed c, else the ``percentile``-th percentile of training activations (OpenOOD v1.5's
#: ReAct sweep), found by :class:`ActivationSampler` within ``max_samples`` values in memory.
CLIP = HParam(
    None, optional(positive()), doc="fixed clipping threshold c > 0, or None to estimate it"
)
CLIP_PERCENTILE = HParam(
    90.0,
    percent(),
    search=(85, 90, 95, 99),
    stage="finalize",
    doc="percentile of training activations used when clip is None, in (0, 100]",
)
SAMPLER_MAX_SAMPLES = HParam(
    1 << 26,
    integer(1),
    doc="activation values held in memory for the percentile; beyond it the exact value "
    "takes one more pass over the training features (radix selection)",
)


class ActivationSampler:
    """The exact ``percentile``-th percentile of every training activation (ReAct's clip c).

    All q entries of every training sample's penultimate features enter
    (:class:`~lightning_ood.detectors.quantile.StreamingPercentile`): kept in memory up to
    ``max_samples`` values and sorted (one pass; 50,000 CIFAR images x 342 features fit the
    default), beyond that found by an exact radix selection that asks the engine for one more
    pass over the training features (:meth:`next_pass`; float32: two passes in all), in
    O(65,536) memory. Under DDP the counts (or kept values) of all ranks are combined, so the
    value equals the single-process one. A mixin for
    :class:`~lightning_ood.detectors.base.Detector` subclasses that declare ``percentile`` and
    ``max_samples`` and call :meth:`_reset_sampler` in ``__init__``.
    """

    #: Declared by the detector as HParams (ReAct, DICE+ReAct: :data:`CLIP_PERCENTILE` and
    #: :data:`SAMPLER_MAX_SAMPLES`): the percentile in (0, 100] (stage "finalize") and the
    #: values held in memory (stage "fit").
    percentile: float
    max_samples: int

    def _reset_sampler(self) -> None:
        self._quantile = StreamingPercentile(self.percentile, self.max_samples)

    def _sample_update(self, h: Tensor) -> None:
        self._quantile.add(h)

    def _sample_next_pass(self, reducer: Reducer) -> bool:
        """Close a pass over the training features; True when one more is needed. The
        percentile is read here (not at ``reset``), so it stays a finalize-only value."""
        self._quantile.p = self.percentile
        return self._quantile.end_pass(reducer)

    def _sample_percentile(self, reducer: Reducer, num_features: int) -> Tensor:
        """The exact percentile of the (all-rank) training activations."""
        q = self._quantile
        if q.value is None and not q.selecting and q.passes == 0:
            self._sample_next_pass(reducer)  # callers that finalize without the engine
        if q.value is None:
            raise RuntimeError(
                f"{type(self).__name__}.finalize: the exact clipping percentile needs "
                f"{'another pass' if q.selecting else 'a pass'} over the training features; "
                "fit through lightning_ood.engine.fit_detectors (which runs the passes "
                "next_pass() asks for) or set a fixed `clip`"
            )
        value = q.value
        self._reset_sampler()  # nothing of the stream is kept once the value is known
        return value

    def _upgrade_state_dict(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Checkpoints of the strided sampler held an (emptied) ``act_sample`` buffer."""
        state_dict.pop(prefix + "act_sample", None)
        super()._upgrade_state_dict(state_dict, prefix)  # type: ignore[misc]


__all__ = ["ActivationSampler", "LinearHeadDetector", "MeanHeadDetector"]
