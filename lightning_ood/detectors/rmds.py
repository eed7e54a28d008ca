"""RMDS, the relative Mahalanobis distance (Ren et al. 2021, "A Simple Fix to Mahalanobis
Distance for Improving Near-OOD Detection").

Class-conditional Gaussians N(μ_k, Σ) with one shared covariance (as Lee et al.'s Mahalanobis)
plus a background Gaussian N(μ_0, Σ_0) fitted to all training features regardless of class;
paper Sec. 3: RMD_k(x) = MD_k(x) - MD_0(x) and the confidence is ``-min_k RMD_k(x)``
(higher = more ID).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.class_stats import ClassMomentsDetector
from lightning_ood.detectors.mahalanobis import covariance_pinv, squared_distances
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class RMDS(ClassMomentsDetector):
    """Relative Mahalanobis distance on the penultimate features.

    Fitting streams float64 per-class sums, counts and Σ x xᵀ
    (:class:`~lightning_ood.detectors.class_stats.ClassMomentsDetector`, reduced across DDP
    ranks in :meth:`finalize`). Both covariances are the biased (divide by N) estimates of OpenOOD
    v1.5's ``sklearn.covariance.EmpiricalCovariance``: the within-class
    ``Σ = (Σ_i x_i x_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N`` and the background
    ``Σ_0 = Σ_i x_i x_iᵀ / N - μ_0 μ_0ᵀ``; precisions by ``pinv(·, hermitian=True)`` (sklearn's
    ``pinvh``; a Cholesky inverse where that provably equals it, ``covariance_pinv``). The
    distances come from Mahalanobis' ``squared_distances``.
    No hyperparameter (OpenOOD v1.5 ``rmds.yml`` has no sweep).
    """

    kind: ClassVar[str] = "rmds"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("means", torch.zeros(0, 0, dtype=f64))  # μ_k, (L, q)
        self.register_buffer("precision", torch.zeros(0, 0, dtype=f64))  # Σ⁺, (q, q)
        self.register_buffer("background_mean", torch.zeros(0, dtype=f64))  # μ_0, (q,)
        self.register_buffer("background_precision", torch.zeros(0, 0, dtype=f64))  # Σ_0⁺

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums, counts and Σ x xᵀ (float64)."""
        self.add_class_moments(out, target, out.features)  # the Gram memo key Mahalanobis uses

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums, then derive μ_k, Σ⁺, μ_0 and Σ_0⁺."""
        counts, sums, outer, self.means, cov = self.tied_gaussian(model, reducer or Reducer())
        total = counts.sum()
        mean0 = sums.sum(dim=0) / total
        cov0 = outer / total - torch.outer(mean0, mean0)
        self.precision = covariance_pinv(cov)
        self.background_mean = mean0
        self.background_precision = covariance_pinv(0.5 * (cov0 + cov0.T))
        self.fitted.fill_(True)

    def relative_distances(self, features: Tensor) -> Tensor:
        """RMD_k(x) = MD_k(x) - MD_0(x) for every class, (B, L) float64."""
        self.checked_features(features, self.means)
        md = squared_distances(features, self.means, self.precision)
        md0 = squared_distances(features, self.background_mean[None], self.background_precision)
        return md - md0

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.relative_distances(out.features).min(dim=1).values


__all__ = ["RMDS"]
