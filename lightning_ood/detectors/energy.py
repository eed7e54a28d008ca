"""Energy score (Liu et al. 2020), also the scoring rule of ReAct, DICE and LINe."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel
from lightning_ood.detectors.hparams import HParam, positive
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy T·logsumexp(f/T) (Liu et al. 2020); shape (B,)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


@register_detector
class Energy(Detector):
    """Energy score T·logsumexp(f(x)/T) (docs/methods.md#energy)."""

    kind = "energy"
    uses_training_data = False
    temperature = HParam(1.0, positive(), stage="score", doc="T > 0 (1 in the papers)")

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return energy_score(out.logits, self.temperature)


__all__ = ["Energy", "energy_score"]
