"""ReweightOOD (Regmi et al., CVPR Workshops 2024, "ReweightOOD: Loss Reweighting for
Distance-based OOD Detection"): the post-hoc score it applies to a trained network.

ReweightOOD is a *training* method: a contrastive loss on a projection head whose positive
and negative pairs are reweighted by sigmoids of their similarity (hard positives and hard
negatives weigh more; OpenOOD's ``reweightood_trainer.py``). At test time the head is dropped
and the L2-normalised penultimate embedding z = h/‖h‖ is scored by its Mahalanobis distance to
the closest class (class means, one shared covariance):

    S(x) = -min_k (z - μ_k)ᵀ Σ⁻¹ (z - μ_k)        (higher = more ID)

which is what OpenOOD v1.5's ``reweightood_postprocessor.py`` computes on CIDERNet's
``intermediate_forward`` (the normalised backbone feature). This detector is that score; it
runs on any classifier, and reaches the paper's numbers only on a network trained with the
ReweightOOD loss (training is not part of it). See docs/methods.md#reweightood.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.class_stats import ClassMomentsDetector
from lightning_ood.detectors.hparams import HParam, boolean
from lightning_ood.detectors.knn import normalize_rows
from lightning_ood.detectors.mahalanobis import covariance_pinv, squared_distances
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class ReweightOOD(ClassMomentsDetector):
    """-min_k Mahalanobis distance of z = h/‖h‖ to the class means (shared covariance).

    Fitting streams float64 per-class sums, counts and Σ z zᵀ of the normalised training
    features (:class:`~lightning_ood.detectors.class_stats.ClassMomentsDetector`, reduced across
    DDP ranks in :meth:`finalize`); the covariance is the biased
    within-class estimate of OpenOOD's ``sklearn.covariance.EmpiricalCovariance`` on
    class-centred features, ``Σ = (Σ_i z_i z_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N``, and the precision its
    pseudo-inverse (sklearn's ``pinvh``; :func:`~lightning_ood.detectors.mahalanobis.
    covariance_pinv`).
    """

    kind = "reweightood"
    #: OpenOOD v1.5 ``reweightood.yml`` has no hyperparameter and no sweep.
    normalize = HParam(
        True,
        boolean(),
        doc="L2-normalise the features first (the paper and OpenOOD); false: plain "
        "Mahalanobis on h",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("means", torch.zeros(0, 0, dtype=f64))  # μ_k, (L, q)
        self.register_buffer("precision", torch.zeros(0, 0, dtype=f64))  # Σ⁺, (q, q)

    def embed(self, features: Tensor) -> Tensor:
        """z = h/‖h‖ (or h with ``normalize: false``)."""
        return normalize_rows(features) if self.normalize else features

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums, counts and Σ z zᵀ (float64)."""
        self.add_class_moments(out, target, self.embed(out.features.detach()))

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums, then derive μ_k and Σ⁺."""
        *_, self.means, cov = self.tied_gaussian(model, reducer or Reducer())
        self.precision = covariance_pinv(cov)
        self.fitted.fill_(True)

    def distances(self, features: Tensor) -> Tensor:
        """(z - μ_k)ᵀ Σ⁺ (z - μ_k) for every class, (B, L) float64."""
        z = self.embed(self.checked_features(features, self.means))
        return squared_distances(z, self.means, self.precision)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.distances(out.features).min(dim=1).values


__all__ = ["ReweightOOD"]
