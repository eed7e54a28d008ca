"""DICE (Sun & Li 2022): energy of the logits of a sparsified classifier head."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer, percentile
from lightning_ood.detectors.hparams import HParam, in_range, optional, positive
from lightning_ood.detectors.linear_head import MeanHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class DICE(MeanHeadDetector):
    """DICE: energy of logits from a sparsified head, (W ⊙ M) h + b (Sun & Li 2022).

    ā is the mean penultimate feature over the whole training set (all classes, unclipped);
    V = ā ⊙ W (broadcast over the L rows); M = 1[V > percentile(V, p)] over all L·q entries.
    The weight percentile is the buffer ``prune_threshold``; ``threshold`` is the decision
    threshold of every detector (NaN until :meth:`calibrate`).

    ``update`` only sums features; the mask (``p``) and the clip are derived in finalize.
    """

    kind = "dice"
    #: OpenOOD v1.5's DICE sweep of the pruned percentage.
    p = HParam(
        90.0,
        in_range(0.0, 100.0),
        search=(10, 30, 50, 70, 90),
        stage="finalize",
        doc="percent of weights pruned, in [0, 100) (90 for CIFAR)",
    )
    clip = HParam(
        None,
        optional(positive()),
        stage="finalize",
        doc="optional fixed ReAct bound applied to test features before the sparse head",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("prune_threshold", torch.zeros(()))  # percentile(V, p)
        self.register_buffer("mask", torch.zeros(0, dtype=torch.bool))  # M, (L, q)
        self.register_buffer("clip_value", torch.full((), torch.inf))  # inf = no clipping

    def _clip_value(self, reducer: Reducer) -> Tensor:
        return torch.tensor(torch.inf if self.clip is None else self.clip)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        self._finalize_mean(model, reducer)  # copies the head; ā over all ranks
        weight = self.weight
        contrib = weight * self.feature_mean  # V = ā ⊙ W, (L, q)
        self.prune_threshold = percentile(contrib.flatten(), self.p)
        self.mask = contrib > self.prune_threshold
        self.clip_value = self._clip_value(reducer).to(weight)
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features).clamp(max=self.clip_value)
        w = torch.where(self.mask, self.weight, self.weight.new_zeros(()))
        return torch.logsumexp(h @ w.T + self.bias, dim=1)

    def _upgrade_state_dict(self, state_dict: dict[str, Tensor], prefix: str) -> None:
        """Checkpoints before ``prune_threshold`` kept the weight percentile in ``threshold``,
        the decision threshold's name: unless :meth:`calibrate` overwrote it (a finite
        ``threshold_tpr``), it is no decision threshold and loads as NaN; ``prune_threshold``
        is recomputed from the stored head and mean, exactly as :meth:`finalize` derives it."""
        old, new = prefix + "threshold", prefix + "prune_threshold"
        if old in state_dict and new not in state_dict:
            tpr = state_dict.get(prefix + "threshold_tpr")
            if tpr is None or not bool(torch.isfinite(tpr).all()):
                state_dict[old] = torch.tensor(math.nan, dtype=torch.float64)
            weight = state_dict.get(prefix + "weight")
            mean = state_dict.get(prefix + "feature_mean")
            if weight is not None and mean is not None and weight.numel() and mean.numel():
                state_dict[new] = percentile((weight * mean).flatten(), self.p)
            else:  # saved before fitting
                state_dict[new] = torch.zeros(())
        super()._upgrade_state_dict(state_dict, prefix)


__all__ = ["DICE"]
