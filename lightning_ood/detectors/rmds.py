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

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer
from lightning_ood.detectors.mahalanobis import batch_gram, covariance_pinv, squared_distances
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class RMDS(Detector):
    """Relative Mahalanobis distance on the penultimate features.

    Fitting streams float64 per-class sums, counts and Σ x xᵀ (reduced across DDP ranks in
    :meth:`finalize`). Both covariances are the biased (divide by N) estimates of OpenOOD
    v1.5's ``sklearn.covariance.EmpiricalCovariance``: the within-class
    ``Σ = (Σ_i x_i x_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N`` and the background
    ``Σ_0 = Σ_i x_i x_iᵀ / N - μ_0 μ_0ᵀ``; precisions by ``pinv(·, hermitian=True)`` (sklearn's
    ``pinvh``; a Cholesky inverse where that provably equals it, ``covariance_pinv``). The
    distances come from Mahalanobis' ``squared_distances``.
    No hyperparameter (OpenOOD v1.5 ``rmds.yml`` has no sweep).
    """

    kind: ClassVar[str] = "rmds"
    requires_fit: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("class_count", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("class_sum", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("outer", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("means", torch.zeros(0, 0, dtype=f64))  # μ_k, (L, q)
        self.register_buffer("precision", torch.zeros(0, 0, dtype=f64))  # Σ⁺, (q, q)
        self.register_buffer("background_mean", torch.zeros(0, dtype=f64))  # μ_0, (q,)
        self.register_buffer("background_precision", torch.zeros(0, 0, dtype=f64))  # Σ_0⁺

    def reset(self) -> None:
        dev = self.fitted.device
        self.class_count = torch.zeros(0, dtype=torch.float64, device=dev)
        self.class_sum = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.outer = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums, counts and Σ x xᵀ (float64)."""
        h = out.features.detach().double()
        y = target.reshape(-1).long()
        n_classes = out.logits.shape[1]
        if h.dim() != 2 or h.shape[0] != y.shape[0]:
            raise ValueError(
                f"{self.name}: features {tuple(h.shape)} and targets {tuple(y.shape)} must be "
                "(B, q) and (B,)"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"{self.name}: targets must be class indices in [0, {n_classes}) (logits width), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        if self.class_sum.numel() == 0:
            self.class_count = h.new_zeros(n_classes)
            self.class_sum = h.new_zeros(n_classes, h.shape[1])
            self.outer = h.new_zeros(h.shape[1], h.shape[1])
        elif self.class_sum.shape != (n_classes, h.shape[1]):
            raise ValueError(
                f"{self.name}: (classes, features) changed from {tuple(self.class_sum.shape)} "
                f"to {(n_classes, h.shape[1])} during fitting"
            )
        self.class_count += torch.bincount(y, minlength=n_classes).to(h)
        self.class_sum.index_add_(0, y, h)
        self.outer += batch_gram(out.features, h)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums, then derive μ_k, Σ⁺, μ_0 and Σ_0⁺."""
        reducer = reducer or Reducer()
        if self.class_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            q, n_classes = model.num_features, model.num_classes
            dev = self.fitted.device
            self.class_count = torch.zeros(n_classes, dtype=torch.float64, device=dev)
            self.class_sum = torch.zeros(n_classes, q, dtype=torch.float64, device=dev)
            self.outer = torch.zeros(q, q, dtype=torch.float64, device=dev)
        counts = reducer.sum(self.class_count.clone())
        sums = reducer.sum(self.class_sum.clone())
        outer = reducer.sum(self.outer.clone())
        total = counts.sum()
        if float(total) == 0:
            raise RuntimeError(f"{self.name}: finalize() before any update(); no training data")
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"{self.name}: classes {empty} have no training samples; the class means are "
                "undefined (fit on a set that covers every class)"
            )
        means = sums / counts[:, None]
        cov = (outer - sums.T @ means) / total  # Σ_k n_k μ_k μ_kᵀ = sumsᵀ · means
        mean0 = sums.sum(dim=0) / total
        cov0 = outer / total - torch.outer(mean0, mean0)
        self.means = means
        self.precision = covariance_pinv(0.5 * (cov + cov.T))
        self.background_mean = mean0
        self.background_precision = covariance_pinv(0.5 * (cov0 + cov0.T))
        self.fitted.fill_(True)

    def relative_distances(self, features: Tensor) -> Tensor:
        """RMD_k(x) = MD_k(x) - MD_0(x) for every class, (B, L) float64."""
        self.check_fitted()
        if features.dim() != 2 or features.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {self.means.shape[1]}), got "
                f"{tuple(features.shape)}; was the detector fitted on another backbone?"
            )
        md = squared_distances(features, self.means, self.precision)
        md0 = squared_distances(features, self.background_mean[None], self.background_precision)
        return md - md0

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.relative_distances(out.features).min(dim=1).values


__all__ = ["RMDS"]
