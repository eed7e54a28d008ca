"""Mahalanobis detector (Lee et al., NeurIPS 2018, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks").

Per tap, a class-conditional Gaussian with class means μ_k and ONE shared (tied) covariance Σ
is fitted on the training set; the score is the negated distance to the closest class,
``M(x) = -min_k (f(x) - μ_k)ᵀ Σ⁻¹ (f(x) - μ_k)`` (the paper's confidence score; the reference
codes use ``-½·`` the same quantity, a rescaling). Optional input pre-processing and a
logistic-regression "feature ensemble" over taps (both in the paper's Algorithm 1), shared with
FSSD.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.class_stats import (  # noqa: F401  (_GRAM: the memo, re-exported)
    _GRAM,
    batch_gram,
    require_every_class,
    tied_covariance,
)
from lightning_ood.detectors.layer_ensemble import (
    LayerEnsembleDetector,
    divide_by_input_std,
    input_gradient,
)
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import FEATURES, BackboneOutput, OODBackbone


def pool_tap(t: Tensor, tap: str = "") -> Tensor:
    """(B, C, *spatial) -> (B, C) by averaging every dim after the channel dim (Lee et al.
    pool conv maps spatially); (B, C) passes through."""
    if t.ndim < 2:
        raise ValueError(f"tap {tap!r} has shape {tuple(t.shape)}; expected (B, C) or (B, C, ...)")
    return t if t.ndim == 2 else t.flatten(2).mean(dim=2)


def squared_distances(f: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """(B, L) of (f_b - μ_k)ᵀ P (f_b - μ_k), expanded so no (B, L, C) tensor is built;
    computed in float64, where the expansion's cancellation is harmless."""
    f, means, precision = f.double(), means.double(), precision.double()
    pf = f @ precision
    fpf = (pf * f).sum(dim=1, keepdim=True)
    mpm = ((means @ precision) * means).sum(dim=1)
    return (fpf - 2.0 * pf @ means.T + mpm).clamp_min(0.0)


def covariance_pinv(cov: Tensor) -> Tensor:
    """``torch.linalg.pinv(cov, hermitian=True)`` of a symmetric covariance, through a Cholesky
    factorisation when that provably gives the same matrix, else ``pinv`` itself.

    ``pinv`` drops the eigenvalues below ``rtol·λ_max`` (``rtol = eps·C``, its default). With
    λ_max <= ‖Σ‖_F and λ_min >= 1/‖Σ⁻¹‖_F, a Cholesky inverse whose Frobenius condition
    number stays below half of 1/rtol drops none, so it is the pseudo-inverse (to rounding),
    at a fraction of the eigendecomposition's cost. Singular or nearly singular covariances
    (dead units) take ``pinv``."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        inv = torch.cholesky_inverse(chol)
        rtol = torch.finfo(cov.dtype).eps * cov.shape[0]
        kappa = torch.linalg.matrix_norm(cov) * torch.linalg.matrix_norm(inv)
        if bool(torch.isfinite(kappa)) and float(kappa) * rtol < 0.5:
            return 0.5 * (inv + inv.T)
    return torch.linalg.pinv(cov, hermitian=True)


@register_detector
class Mahalanobis(LayerEnsembleDetector):
    """Class means + tied covariance per tap, negated minimum Mahalanobis distance.

    Fitting streams sums (per-class feature sums, counts, and Σ x xᵀ) in float64, reduced
    across DDP ranks in :meth:`finalize`; the within-class covariance is
    ``Σ = (Σ_i x_i x_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N`` (the biased estimate of the reference's
    ``sklearn.covariance.EmpiricalCovariance`` on class-centred features), and the precision
    is ``torch.linalg.pinv(Σ, hermitian=True)`` (the reference uses scipy's ``pinvh``; through
    a Cholesky inverse where that provably equals it, :func:`covariance_pinv`).
    Means and precisions are float64 buffers ``means_<i>``/``precision_<i>``.

    Input pre-processing (``epsilon`` > 0): per tap (as the reference), the closest class k̂
    is found on the clean input and ``x̃ = x - ε·sign(∇ₓ d_k̂(x))/input_std`` moves toward it,
    raising the score; the sign is taken as +1 where the gradient is >= 0 (the reference's
    ``torch.ge``). Costs K extra forward+backward and K forward passes per batch. ``taps``
    None reads ``["features"]``; taps with spatial dims (B, C, H, W) are mean-pooled to
    (B, C). The hyperparameters are
    :class:`~lightning_ood.detectors.layer_ensemble.LayerEnsembleDetector`'s.
    """

    kind: ClassVar[str] = "mahalanobis"
    requires_fit: ClassVar[bool] = True
    uses_training_data: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tap_list = list(self._taps_arg) if self._taps_arg is not None else [FEATURES]
        f64 = torch.float64
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("class_count", torch.zeros(0, dtype=f64), persistent=False)
        for i in range(len(self._tap_list)):
            self.register_buffer(f"class_sum_{i}", torch.zeros(0, 0, dtype=f64), persistent=False)
            self.register_buffer(f"outer_{i}", torch.zeros(0, 0, dtype=f64), persistent=False)
            self.register_buffer(f"covariance_{i}", torch.zeros(0, 0, dtype=f64), persistent=False)
            self.register_buffer(f"means_{i}", torch.zeros(0, 0, dtype=f64))
            self.register_buffer(f"precision_{i}", torch.zeros(0, 0, dtype=f64))

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self._tap_list)

    def means(self, i: int) -> Tensor:
        """Class means μ (L, C) of tap ``i``."""
        return getattr(self, f"means_{i}")

    def precision(self, i: int) -> Tensor:
        """Shared precision Σ⁺ (C, C) of tap ``i``."""
        return getattr(self, f"precision_{i}")

    def covariance(self, i: int) -> Tensor:
        """Shared covariance Σ (C, C) of tap ``i`` (only after :meth:`finalize`; not saved)."""
        return getattr(self, f"covariance_{i}")

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        dev = self.fitted.device
        self.class_count = torch.zeros(0, dtype=torch.float64, device=dev)
        for i in range(len(self._tap_list)):
            setattr(self, f"class_sum_{i}", torch.zeros(0, 0, dtype=torch.float64, device=dev))
            setattr(self, f"outer_{i}", torch.zeros(0, 0, dtype=torch.float64, device=dev))
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums, counts and Σ x xᵀ (float64)."""
        y = target.reshape(-1).long()
        n_classes = out.logits.shape[1]
        counts = torch.bincount(y, minlength=n_classes)
        if counts.numel() != n_classes:
            raise ValueError(
                f"{self.name}: target holds label {int(y.max())} but the model has "
                f"{n_classes} classes (logits width)"
            )
        if self.class_count.numel() == 0:
            self.class_count = torch.zeros(n_classes, dtype=torch.float64, device=y.device)
        elif self.class_count.numel() != n_classes:
            raise ValueError(
                f"{self.name}: logits width changed from {self.class_count.numel()} to {n_classes}"
            )
        self.class_count += counts.to(self.class_count)
        for i, tap in enumerate(self._tap_list):
            raw = pool_tap(out.tap(tap), tap)
            f = raw.double()
            if f.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: tap {tap!r} has {f.shape[0]} samples but target has {y.shape[0]}"
                )
            sums, outer = getattr(self, f"class_sum_{i}"), getattr(self, f"outer_{i}")
            if sums.numel() == 0:
                sums = torch.zeros(n_classes, f.shape[1], dtype=torch.float64, device=f.device)
                outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
            elif sums.shape[1] != f.shape[1]:
                raise ValueError(
                    f"{self.name}: tap {tap!r} width changed from {sums.shape[1]} to {f.shape[1]}"
                )
            sums.index_add_(0, y, f)
            outer += batch_gram(raw, f)
            setattr(self, f"class_sum_{i}", sums)
            setattr(self, f"outer_{i}", outer)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums, then derive μ_k, Σ (within-class, biased) and Σ⁺ per tap."""
        reducer = reducer or Reducer()
        if self.class_count.numel() == 0:
            raise RuntimeError(
                f"{self.name}: finalize() before any update(); no training batch was seen"
            )
        counts = reducer.sum(self.class_count.clone())
        require_every_class(self.name, counts)
        for i in range(len(self._tap_list)):
            sums = reducer.sum(getattr(self, f"class_sum_{i}").clone())
            outer = reducer.sum(getattr(self, f"outer_{i}").clone())
            means, cov = tied_covariance(counts, sums, outer)
            setattr(self, f"means_{i}", means)
            setattr(self, f"covariance_{i}", cov)
            setattr(self, f"precision_{i}", covariance_pinv(cov))
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def _distances(self, feat: Tensor, i: int) -> Tensor:
        f = pool_tap(feat, self._tap_list[i])
        means = self.means(i)
        if f.shape[1] != means.shape[1]:
            raise ValueError(
                f"{self.name}: tap {self._tap_list[i]!r} gives {f.shape[1]} channels but was "
                f"fitted with {means.shape[1]}; refit the detector for this backbone"
            )
        return squared_distances(f, means, self.precision(i))

    def _closest_distance(self, feat: Tensor, i: int) -> Tensor:
        """Differentiable d_k̂ with k̂ the closest class of the (detached) features."""
        f = pool_tap(feat, self._tap_list[i]).double()
        with torch.no_grad():
            k = self._distances(f, i).argmin(dim=1)
        diff = f - self.means(i)[k]
        return ((diff @ self.precision(i)) * diff).sum(dim=1)

    def component(self, feat: Tensor, i: int) -> Tensor:
        """-min_k Mahalanobis distance of tap ``i`` (float64); higher = more ID."""
        return -self._distances(feat, i).min(dim=1).values

    def perturb(self, model: OODBackbone, x: Tensor, i: int) -> Tensor:
        """x̃ = x - ε·sign(∇ₓ d_k̂)/input_std for tap ``i`` (Lee et al.'s input pre-processing)."""
        grad = input_gradient(model, x, self._tap_list[i], lambda f: self._closest_distance(f, i))
        sign = torch.where(grad >= 0, 1.0, -1.0).to(grad.dtype)
        return (x - self.epsilon * divide_by_input_std(sign, self.input_std)).detach()


__all__ = ["Mahalanobis", "batch_gram", "covariance_pinv", "pool_tap", "squared_distances"]
