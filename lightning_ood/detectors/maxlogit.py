"""MaxLogit (Hendrycks et al. 2022, "Scaling Out-of-Distribution Detection for Real-World
Settings"): the largest unnormalised logit, max_k f_k(x)."""

from __future__ import annotations

from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


@register_detector
class MaxLogit(Detector):
    """Maximum logit, max_k f_k(x): MSP without the softmax normalisation, which hides how
    large the winning logit is (the paper's argument for large label spaces)."""

    kind = "maxlogit"
    uses_training_data = False

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return out.logits.amax(dim=1)


__all__ = ["MaxLogit"]
