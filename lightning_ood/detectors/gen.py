"""GEN (Liu et al. 2023, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
Detection"): the negated generalized entropy of the top-M softmax probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, check_range
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


def generalized_entropy(probs: Tensor, gamma: float, top: int) -> Tensor:
    """G_γ(p) = Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ over the ``top`` largest probabilities of each
    row (the paper's eq. for GEN; all of them when ``top`` ≥ the number of classes)."""
    m = min(top, probs.shape[1])
    p = probs.topk(m, dim=1).values
    return (p.pow(gamma) * (1.0 - p).pow(gamma)).sum(dim=1)


@register_detector
class GEN(Detector):
    """GEN: score −G_γ(softmax(f(x))) over the top ``M`` classes; higher = more ID.

    A confident prediction (one probability near 1, the rest near 0) has small generalized
    entropy; γ < 1 makes the measure sensitive to small probabilities of the top classes.

    Args:
        gamma: γ in (0, 1] (paper: 0.1).
        M: classes entering the sum, >= 1 (paper: 100 on ImageNet; all classes when M >= L).
        name: instance name.
    """

    kind = "gen"
    uses_training_data = False
    #: No fitting pass: both enter :meth:`score` only.
    finalize_only: ClassVar[frozenset[str]] = frozenset({"gamma", "M"})
    #: OpenOOD v1.5's GEN sweep (gamma <= 1 here: the paper's range).
    search_space: ClassVar[Mapping[str, Sequence[Any]]] = {
        "gamma": (0.01, 0.1, 0.5, 1.0),
        "M": (10, 50, 100),
    }

    def __init__(self, gamma: float = 0.1, M: int = 100, name: str | None = None) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.gamma = check_range(
            "gamma", gamma, low=0.0, low_open=True, high=1.0, high_open=False, owner=owner
        )
        if isinstance(M, bool) or int(M) != M or M < 1:
            raise ValueError(f"{owner}: hyperparameter M={M!r} must be an integer >= 1")
        self.M = int(M)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        probs = out.logits.softmax(dim=1)
        return -generalized_entropy(probs, self.gamma, self.M)


__all__ = ["GEN", "generalized_entropy"]
