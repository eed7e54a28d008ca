"""Shared parts of the detectors that rescore penultimate features with a copy of the head.

:class:`LinearHeadDetector` copies the classifier (W, b) into buffers at ``finalize``, so
scoring needs features only; :class:`ActivationSampler` keeps the bounded subsample of training
activations that ReAct and DICE+ReAct take their clipping percentile from.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, Reducer, check_range, percentile
from lightning_ood.models.base import OODBackbone


class LinearHeadDetector(Detector):
    """Detectors that recompute logits from features with a copy of the head (W, b)."""

    requires_fit = True

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.register_buffer("weight", torch.zeros(0))  # W, (L, q)
        self.register_buffer("bias", torch.zeros(0))  # b, (L,)

    def _copy_head(self, model: OODBackbone) -> None:
        clf = model.get_classifier()
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


class ActivationSampler:
    """Bounded, strided subsample of training feature rows for the ReAct percentile.

    Keeps every ``stride``-th training sample (all q features of it); when more than
    ``max_samples`` values are held, every other kept row is dropped and the stride doubles.
    The kept rows are thus always an exact stride-``s`` subsample of the stream (the whole set
    while it fits). Whole rows, not a stride over flattened values, so no neuron is favoured.
    Under DDP each rank subsamples its own shard and ``finalize`` concatenates them.
    A mixin for :class:`~lightning_ood.detectors.base.Detector` subclasses, which call
    :meth:`_init_sampler` in ``__init__``.
    """

    act_sample: Tensor
    percentile: float
    max_samples: int

    def _init_sampler(self, percentile: float, max_samples: int) -> None:
        """Validate and store ``percentile`` (in (0, 100]) and ``max_samples``; register the
        ``act_sample`` buffer."""
        owner = type(self).__name__
        self.percentile = check_range(
            "percentile",
            percentile,
            low=0.0,
            low_open=True,
            high=100.0,
            high_open=False,
            owner=owner,
        )
        self.max_samples = int(check_range("max_samples", max_samples, low=1, owner=owner))
        self.register_buffer("act_sample", torch.zeros(0))  # type: ignore[attr-defined]

    def _reset_sampler(self) -> None:
        self.act_sample = self.act_sample.new_zeros(0)
        self._stride = 1
        self._rows_seen = 0

    def _sample_update(self, h: Tensor) -> None:
        h = h.detach()
        if not hasattr(self, "_stride"):
            self._reset_sampler()
        offset = (-self._rows_seen) % self._stride
        rows = h[offset :: self._stride]
        self._rows_seen += h.shape[0]
        stored = self.act_sample if self.act_sample.numel() else rows.new_zeros(0, h.shape[1])
        stored = torch.cat([stored.to(rows.dtype), rows])
        max_rows = max(1, self.max_samples // h.shape[1])
        while stored.shape[0] > max_rows:
            stored = stored[::2]
            self._stride *= 2
        self.act_sample = stored

    def _sample_percentile(self, reducer: Reducer, num_features: int) -> Tensor:
        """The ``percentile``-th percentile of the (all-rank) sample; drops the sample."""
        sample = self.act_sample
        if sample.numel() == 0:  # a rank that saw no batch still joins the gather
            sample = self.act_sample.new_zeros(0, num_features)
        sample = reducer.cat(sample)
        if sample.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}.finalize: no training features were seen; run update() "
                "first or set a fixed `clip`"
            )
        self.act_sample = self.act_sample.new_zeros(0)  # not needed to score
        return percentile(sample.flatten(), self.percentile)


__all__ = ["ActivationSampler", "LinearHeadDetector"]
