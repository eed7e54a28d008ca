"""VRA (Xu et al., NeurIPS 2023, "VRA: Variational Rectified Activation for
Out-of-distribution Detection"): a piecewise rectification of the penultimate activations,
then the energy of the head applied to them (docs/methods.md#vra)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import InvalidConfiguration, OptInput, OptModel, Reducer
from lightning_ood.detectors.base import percentile as sorted_percentile
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.hparams import HParam, boolean, choice, in_range, integer, percent
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.quantile import StreamingPercentile
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: ``"paper"``: 0 below α, h + γ on [α, β], β above (the paper's VRA / VRA+ and the authors'
#: code); ``"openood"``: clamp(h, α, β) (OpenOOD v1.5's ``vra_postprocessor``).
VARIANTS = ("paper", "openood")


def rectify(h: Tensor, low: Tensor, high: Tensor, gamma: float, variant: str) -> Tensor:
    """VRA's rectification of activations ``h`` with thresholds α = ``low``, β = ``high``
    (scalars or per-unit (q,) tensors, broadcast over the batch)."""
    if variant == "openood":
        return torch.minimum(torch.maximum(h, low), high)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    mid = h + gamma if gamma else h
    return torch.where(h < low, zero, torch.where(h > high, high.expand_as(h), mid))


@register_detector
class VRA(LinearHeadDetector):
    """Energy of W g(h) + b, g VRA's piecewise rectification with training-set thresholds.

    α and β are the ``percentile_low``-th and ``percentile_high``-th percentiles of the
    training activations: of all q entries of every training sample together (``per_unit``
    False, OpenOOD), exact at any scale by
    :class:`~lightning_ood.detectors.quantile.StreamingPercentile` (a second pass beyond
    ``max_samples`` values); or of each unit separately (``per_unit`` True, the authors'
    ``torch.quantile(feat, q, dim=0)``), from the training features kept in memory (at most
    ``max_samples`` values, refused beyond).
    """

    kind = "vra"
    #: OpenOOD v1.5's VRA sweep.
    percentile_high = HParam(
        90.0,
        percent(),
        search=(85, 90, 95, 99),
        stage="finalize",
        doc="β: percentile of the training activations above which h becomes β",
    )
    percentile_low = HParam(
        10.0,
        percent(low_open=False),
        search=(1, 5, 10, 15),
        stage="finalize",
        doc="α: percentile of the training activations below which h becomes 0 (α: openood)",
    )
    gamma = HParam(
        0.0,
        in_range(0.0),
        stage="score",
        doc="γ >= 0 added to the activations in [α, β] (0: VRA, > 0: VRA+; paper only)",
    )
    variant = HParam(
        "paper", choice(*VARIANTS), stage="score", doc="paper (0 / h+γ / β) or openood (clamp)"
    )
    per_unit = HParam(
        False, boolean(), doc="thresholds per feature unit (authors' code) instead of global"
    )
    temperature = HParam(1.0, in_range(0.0, low_open=True), stage="score", doc="energy T > 0")
    max_samples = HParam(
        1 << 26,
        integer(1),
        doc="activation values held in memory; beyond it the global percentiles take one more "
        "pass (radix selection) and per-unit thresholds are refused",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.percentile_low > self.percentile_high:
            raise ValueError(
                f"VRA: percentile_low={self.percentile_low} exceeds percentile_high="
                f"{self.percentile_high}; α must not be above β"
            )
        if self.gamma and self.variant == "openood":
            raise ValueError("VRA: gamma > 0 (VRA+) is a paper-variant option; use variant=paper")
        self.register_buffer("low", torch.zeros(0))  # α: () or (q,)
        self.register_buffer("high", torch.zeros(0))  # β: () or (q,)
        self._reset_stream()

    def _reset_stream(self) -> None:
        self._streams = [
            StreamingPercentile(p, self.max_samples)
            for p in (self.percentile_low, self.percentile_high)
        ]
        self._rows: list[Tensor] = []
        self._kept = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> VRA:
        """Copies (tuning candidates) share the kept training rows, never modified in place."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = list(value) if key == "_rows" else copy.deepcopy(value, memo)
        return new

    def reset(self) -> None:
        self._reset_stream()
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        h = out.features.detach()
        if self.per_unit:
            self._kept += h.numel()
            if self._kept > self.max_samples:
                raise InvalidConfiguration(
                    f"{self.name} (vra): per-unit thresholds keep every training activation, "
                    f"and {self._kept} exceed max_samples={self.max_samples}; raise max_samples "
                    "or use per_unit: false (exact global percentiles at any scale)"
                )
            self._rows.append(h)
        else:
            for s in self._streams:
                if s.value is None:  # one may be done while the other selects on
                    s.add(h)

    def next_pass(self, reducer: Reducer) -> bool:
        if self.per_unit:
            return False
        for s, p in zip(self._streams, (self.percentile_low, self.percentile_high), strict=True):
            s.p = p  # read here, not at reset: the percentiles stay finalize-only
        more = [s.end_pass(reducer) if s.value is None else False for s in self._streams]
        return any(more)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        self._copy_head(model)
        q = self.weight.shape[1]
        if self.per_unit:
            mine = torch.cat(self._rows) if self._rows else self.weight.new_zeros(0, q)
            rows = reducer.cat(mine.to(self.weight))
            if rows.shape[0] == 0:
                raise RuntimeError(f"{self.name}: finalize() before any training batch")
            low = sorted_percentile(rows.double(), self.percentile_low, dim=0)
            high = sorted_percentile(rows.double(), self.percentile_high, dim=0)
        else:
            if all(s.passes == 0 for s in self._streams):
                self.next_pass(reducer)  # callers that finalize without the engine
            if any(s.value is None for s in self._streams):
                raise RuntimeError(
                    f"{self.name}: the exact percentiles need another pass over the training "
                    "features; fit through lightning_ood.engine.fit_detectors"
                )
            low, high = (s.value for s in self._streams)  # type: ignore[misc]
        self.low = low.to(self.weight)
        self.high = high.to(self.weight)
        self._reset_stream()
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features)
        g = rectify(h, self.low, self.high, self.gamma, self.variant)
        return energy_score(g @ self.weight.T + self.bias, self.temperature)


__all__ = ["VARIANTS", "VRA", "rectify"]
