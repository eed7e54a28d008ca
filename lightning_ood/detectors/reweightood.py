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

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, boolean
from lightning_ood.detectors.knn import normalize_rows
from lightning_ood.detectors.mahalanobis import batch_gram, covariance_pinv, squared_distances
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class ReweightOOD(Detector):
    """-min_k Mahalanobis distance of z = h/‖h‖ to the class means (shared covariance).

    Fitting streams float64 per-class sums, counts and Σ z zᵀ of the normalised training
    features (reduced across DDP ranks in :meth:`finalize`); the covariance is the biased
    within-class estimate of OpenOOD's ``sklearn.covariance.EmpiricalCovariance`` on
    class-centred features, ``Σ = (Σ_i z_i z_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N``, and the precision its
    pseudo-inverse (sklearn's ``pinvh``; :func:`~lightning_ood.detectors.mahalanobis.
    covariance_pinv`).
    """

    kind = "reweightood"
    requires_fit = True
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
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("class_count", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("class_sum", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("outer", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("means", torch.zeros(0, 0, dtype=f64))  # μ_k, (L, q)
        self.register_buffer("precision", torch.zeros(0, 0, dtype=f64))  # Σ⁺, (q, q)

    def embed(self, features: Tensor) -> Tensor:
        """z = h/‖h‖ (or h with ``normalize: false``)."""
        return normalize_rows(features) if self.normalize else features

    def reset(self) -> None:
        dev = self.fitted.device
        self.class_count = torch.zeros(0, dtype=torch.float64, device=dev)
        self.class_sum = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.outer = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums, counts and Σ z zᵀ (float64)."""
        z = self.embed(out.features.detach())
        zd = z.double()
        y = target.reshape(-1).long().to(z.device)
        n_classes = out.logits.shape[1]
        if z.dim() != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(
                f"{self.name}: features {tuple(z.shape)} and targets {tuple(y.shape)} must be "
                "(B, q) and (B,)"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"{self.name}: targets must be class indices in [0, {n_classes}) (logits width), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        if self.class_sum.numel() == 0:
            self.class_count = zd.new_zeros(n_classes)
            self.class_sum = zd.new_zeros(n_classes, z.shape[1])
            self.outer = zd.new_zeros(z.shape[1], z.shape[1])
        elif self.class_sum.shape != (n_classes, z.shape[1]):
            raise ValueError(
                f"{self.name}: (classes, features) changed from {tuple(self.class_sum.shape)} "
                f"to {(n_classes, z.shape[1])} during fitting"
            )
        self.class_count += torch.bincount(y, minlength=n_classes).to(zd)
        self.class_sum.index_add_(0, y, zd)
        self.outer += batch_gram(z, zd)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums, then derive μ_k and Σ⁺."""
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
        self.means = means
        self.precision = covariance_pinv(0.5 * (cov + cov.T))
        self.fitted.fill_(True)

    def distances(self, features: Tensor) -> Tensor:
        """(z - μ_k)ᵀ Σ⁺ (z - μ_k) for every class, (B, L) float64."""
        self.check_fitted()
        if features.dim() != 2 or features.shape[1] != self.means.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {self.means.shape[1]}), got "
                f"{tuple(features.shape)}; was the detector fitted on another backbone?"
            )
        return squared_distances(self.embed(features), self.means, self.precision)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.distances(out.features).min(dim=1).values


__all__ = ["ReweightOOD"]
