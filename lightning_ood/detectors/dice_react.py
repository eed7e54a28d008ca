"""DICE+ReAct (Sun & Li 2022, with Sun et al. 2021): the DICE head on clipped activations."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.dice import DICE
from lightning_ood.detectors.linear_head import (
    CLIP,
    CLIP_PERCENTILE,
    SAMPLER_MAX_SAMPLES,
    ActivationSampler,
)
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class DICEReAct(ActivationSampler, DICE):
    """DICE on ReAct-clipped features: the sparse head applied to min(h, c).

    The mask comes from the unclipped training mean, as in the DICE code. ``c`` is ``clip`` or
    the exact ``percentile``-th percentile of training activations (as in
    :class:`~lightning_ood.detectors.react.ReAct`).

    Unlike DICE, ``clip`` enters ``update`` (``None`` streams activations). The sweep is DICE's
    (OpenOOD v1.5) crossed with ReAct's.
    """

    kind = "dice_react"
    clip = CLIP
    percentile = CLIP_PERCENTILE
    max_samples = SAMPLER_MAX_SAMPLES

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset_sampler()

    def reset(self) -> None:
        super().reset()
        self._reset_sampler()

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        if not self._quantile.selecting:  # the DICE sums take the first pass only
            super().update(out, target, model)
        if self.clip is None:
            self._sample_update(out.features)

    def next_pass(self, reducer: Reducer) -> bool:
        return self.clip is None and self._sample_next_pass(reducer)

    def _clip_value(self, reducer: Reducer) -> Tensor:
        if self.clip is not None:
            return torch.tensor(self.clip)
        return self._sample_percentile(reducer, self.weight.shape[1])


__all__ = ["DICEReAct"]
