"""GEN (Liu et al. 2023, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
Detection"): the negated generalized entropy of the top-M softmax probabilities."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel
from lightning_ood.detectors.hparams import Check, HParam, in_range
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


def generalized_entropy(probs: Tensor, gamma: float, top: int) -> Tensor:
    """G_γ(p) = Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ over the ``top`` largest probabilities of each
    row (the paper's eq. for GEN; all of them when ``top`` ≥ the number of classes)."""
    m = min(top, probs.shape[1])
    p = probs.topk(m, dim=1).values
    return (p.pow(gamma) * (1.0 - p).pow(gamma)).sum(dim=1)


def whole_number(low: int) -> Check:
    """An integer >= ``low``, integral floats (``100.0`` from a YAML sweep) included; bools
    refused."""

    def check(name: str, value: Any, owner: str) -> int:
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float | np.number)
            and math.isfinite(value)
            and int(value) == value
            and value >= low
        )
        if not ok:
            raise ValueError(
                f"{owner}: hyperparameter {name}={value!r} must be an integer >= {low}"
            )
        return int(value)

    return check


@register_detector
class GEN(Detector):
    """GEN: score −G_γ(softmax(f(x))) over the top ``M`` classes; higher = more ID.

    A confident prediction (one probability near 1, the rest near 0) has small generalized
    entropy; γ < 1 makes the measure sensitive to small probabilities of the top classes.
    No fitting pass: both hyperparameters enter :meth:`score` only. The sweeps are OpenOOD
    v1.5's (gamma <= 1 here: the paper's range).
    """

    kind = "gen"
    uses_training_data = False
    gamma = HParam(
        0.1,
        in_range(0.0, 1.0, low_open=True, high_open=False),
        search=(0.01, 0.1, 0.5, 1.0),
        stage="score",
        doc="γ in (0, 1] (paper: 0.1)",
    )
    M = HParam(
        100,
        whole_number(1),
        search=(10, 50, 100),
        stage="score",
        doc="classes entering the sum, >= 1 (paper: 100 on ImageNet; all classes when M >= L)",
    )

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        probs = out.logits.softmax(dim=1)
        return -generalized_entropy(probs, self.gamma, self.M)


__all__ = ["GEN", "generalized_entropy", "whole_number"]
