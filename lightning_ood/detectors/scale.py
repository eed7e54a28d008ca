"""SCALE (Xu et al., ICLR 2024, "Scaling for Training Time and Post-hoc Out-of-distribution
Detection Enhancement"): multiply each sample's whole penultimate feature by ``exp(s1 / s2)``
and score the energy of the head's logits; unlike ASH-S nothing is pruned."""

from __future__ import annotations

from torch import Tensor

from lightning_ood.detectors.ash import (
    PERCENTILE_SWEEP,
    HeadOnlyDetector,
    shaping_ratio,
    top_activations,
)
from lightning_ood.detectors.base import OptInput, OptModel
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.hparams import HParam, in_range, positive
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


@register_detector
class SCALE(HeadOnlyDetector):
    """SCALE: energy of the logits of the scaled feature, ``T·logsumexp((e^r W h + b)/T)``.

    ``r = s1 / s2`` per sample, ``s1`` the sum of all of its q feature values and ``s2`` the
    sum of its ``k = q − round(q·p/100)`` largest ones (ASH's per-sample count,
    :func:`~lightning_ood.detectors.ash.kept_count`; the percentile is the sample's own, no
    training statistics). The paper's post-hoc SCALE is ASH-S without the pruning: the factor
    is ASH-S's, applied to the full feature (the authors' ``scale`` in OpenOOD v1.5
    ``networks/scale_net.py`` multiplies the unpruned input). An all-zero feature gets
    ``r = 0`` (:func:`~lightning_ood.detectors.ash.shaping_ratio`) instead of NaN.

    Like ASH it acts on the pooled penultimate feature (B, q) (``scale_net.py`` reshapes the
    pooled feature to (B, q, 1, 1)), needs no training pass, and copies the head at
    :meth:`finalize` (:class:`~lightning_ood.detectors.ash.HeadOnlyDetector`).

    Nothing is accumulated: both hyperparameters enter :meth:`score` only.
    """

    kind = "scale"
    #: OpenOOD v1.5 ``scale.yml`` sweep.
    percentile = HParam(
        85.0,
        in_range(0.0, 100.0),
        search=PERCENTILE_SWEEP,
        stage="score",
        doc="percent p of each sample's activations left out of s2, in [0, 100) (85: OpenOOD "
        "v1.5's scale.yml; pytorch-ood 0.4.0 defaults to 65)",
    )
    temperature = HParam(1.0, positive(), stage="score", doc="energy temperature T > 0 (paper: 1)")

    def scaled(self, h: Tensor) -> Tensor:
        """``exp(s1 / s2) · h`` for each row of ``h`` (B, q)."""
        values, _ = top_activations(h, self.percentile)
        return h * shaping_ratio(h, values).exp().unsqueeze(1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features)
        return energy_score(self.scaled(h) @ self.weight.T + self.bias, self.temperature)


__all__ = ["SCALE"]
