"""ReAct (Sun et al. 2021): energy of the logits of clipped penultimate activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.hparams import HParam, positive
from lightning_ood.detectors.linear_head import (
    CLIP,
    CLIP_PERCENTILE,
    SAMPLER_MAX_SAMPLES,
    ActivationSampler,
    LinearHeadDetector,
)
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class ReAct(ActivationSampler, LinearHeadDetector):
    """ReAct: Energy of the logits of the clipped features, T·logsumexp((W min(h, c) + b)/T).

    ``c`` is ``clip`` when given, else the ``percentile``-th percentile of training activations
    (all q entries of the penultimate features of every training sample), exact at any scale
    (:class:`~lightning_ood.detectors.linear_head.ActivationSampler`); the reference used ID
    validation images instead. With a fixed ``clip`` no training pass is
    needed: ``finalize`` only copies the head, so scoring needs no model.

    """

    kind = "react"
    clip = CLIP
    #: OpenOOD v1.5's ReAct sweep.
    percentile = CLIP_PERCENTILE
    temperature = HParam(1.0, positive(), stage="score", doc="energy temperature T > 0")
    max_samples = SAMPLER_MAX_SAMPLES

    @property
    def uses_training_data(self) -> bool:  # type: ignore[override]
        """A fixed ``clip`` needs no training pass (finalize only copies the head)."""
        return self.clip is None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset_sampler()
        self.register_buffer("clip_value", torch.zeros(()))  # c actually used

    def reset(self) -> None:
        self._reset_sampler()
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        if self.clip is None:
            self._sample_update(out.features)

    def next_pass(self, reducer: Reducer) -> bool:
        return self.clip is None and self._sample_next_pass(reducer)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        self._copy_head(model)
        if self.clip is None:
            c = self._sample_percentile(reducer or Reducer(), self.weight.shape[1])
        else:
            c = torch.tensor(self.clip)
        self.clip_value = c.to(self.weight)
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features).clamp(max=self.clip_value)
        return energy_score(h @ self.weight.T + self.bias, self.temperature)


__all__ = ["ReAct"]
