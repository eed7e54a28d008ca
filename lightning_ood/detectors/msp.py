"""MSP: maximum softmax probability (Hendrycks & Gimpel 2017), the papers' "Base"/"Baseline"."""

from __future__ import annotations

from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


@register_detector
class MSP(Detector):
    """Maximum softmax probability, max_k softmax(f(x))_k; higher = more in-distribution."""

    kind = "msp"
    uses_training_data = False

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return out.logits.softmax(dim=1).amax(dim=1)


__all__ = ["MSP"]
