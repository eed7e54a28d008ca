"""Energy score (Liu et al. 2020), also the scoring rule of ReAct, DICE and LINe."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, check_range
from lightning_ood.models.base import BackboneOutput


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy T·logsumexp(f/T) (Liu et al. 2020); shape (B,)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


class Energy(Detector):
    """Energy score T·logsumexp(f(x)/T).

    Args:
        temperature: T > 0 (1 in the papers).
        name: instance name.
    """

    kind = "energy"
    uses_training_data = False
    #: No fitting pass: the temperature only enters :meth:`score`.
    finalize_only: ClassVar[frozenset[str]] = frozenset({"temperature"})

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.temperature = check_range(
            "temperature", temperature, low=0.0, low_open=True, owner=type(self).__name__
        )

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return energy_score(out.logits, self.temperature)


__all__ = ["Energy", "energy_score"]
