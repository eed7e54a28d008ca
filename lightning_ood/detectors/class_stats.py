"""Streaming per-class statistics shared by the class-conditional detectors.

Class means ``μ_k = s_k / n_k`` from float64 per-class sums ``s_k = Σ_{y_i=k} x_i`` and counts
``n_k``, and the tied (within-class, biased) covariance of Lee et al.'s Mahalanobis detector,
``Σ = (Σ_i x_i x_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N`` (docs/methods.md#mahalanobis), written once here
for Mahalanobis, RMDS, ReweightOOD, SHE and OpenMax so that their fits cannot drift apart.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import BatchMemo, Detector, Reducer
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: The last batch's Gram matrix: Mahalanobis and RMDS fitted in one pass share it.
_GRAM = BatchMemo()


def batch_gram(f: Tensor, f64: Tensor | None = None) -> Tensor:
    """Σ_i f_i f_iᵀ over the rows of ``f`` (B, C), in float64 (C, C); do not modify it.
    ``f64``: ``f`` already widened to float64, if the caller has it.

    Memoised on the tensor object and its version counter, so several detectors that
    accumulate second moments of the same batch (Mahalanobis and RMDS fitted together by the
    engine) share one float64 product, the dominant cost of their fits."""

    def compute() -> Tensor:
        fd = (f.double() if f64 is None else f64).detach()
        return fd.T @ fd

    return _GRAM.get(f, None, compute)


def check_labelled(
    name: str,
    f: Tensor,
    y: Tensor,
    n_classes: int,
    *,
    what: str = "features",
    shape: str = "(B, q)",
) -> None:
    """Refuse a batch whose ``f`` (B, ·) and labels ``y`` (B,) disagree, or whose labels are not
    class indices in [0, n_classes) (the logits width)."""
    if f.dim() != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: {what} {tuple(f.shape)} and targets {tuple(y.shape)} must be {shape} and (B,)"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{name}: targets must be class indices in [0, {n_classes}) (logits width), "
            f"got values in [{int(y.min())}, {int(y.max())}]"
        )


def require_every_class(
    name: str, counts: Tensor, *, what: str = "class means", correct_only: bool | None = None
) -> None:
    """Refuse per-class counts with an empty class: its mean (``what``) would be 0/0.

    ``correct_only`` (None: the plain message) names the correctly classified subset that SHE
    and OpenMax fit on, and its switch as the fix."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return
    if correct_only is None:
        raise ValueError(
            f"{name}: classes {empty} have no training samples; the {what} are "
            "undefined (fit on a set that covers every class)"
        )
    which = "correctly classified " if correct_only else ""
    raise ValueError(
        f"{name}: classes {empty} have no {which}training sample, so their {what} are "
        "undefined; fit on a set that covers every class"
        + (" or set correct_only: false" if correct_only else "")
    )


def tied_covariance(counts: Tensor, sums: Tensor, outer: Tensor) -> tuple[Tensor, Tensor]:
    """Class means μ (L, q) and the symmetrised tied covariance Σ (q, q) from the sums.

    ``Σ = (Σ_i x_i x_iᵀ - Σ_k n_k μ_k μ_kᵀ) / N`` with ``Σ_k n_k μ_k μ_kᵀ = sumsᵀ · means``: the
    biased estimate of ``sklearn.covariance.EmpiricalCovariance`` on class-centred features
    (Lee et al.'s and OpenOOD's reference)."""
    means = sums / counts[:, None]
    cov = (outer - sums.T @ means) / counts.sum()
    return means, 0.5 * (cov + cov.T)


class ClassMomentsDetector(Detector):
    """Detectors fitted on float64 per-class sums ``class_sum`` (L, q), counts ``class_count``
    (L,) and, with ``second_moment``, Σ x xᵀ ``outer`` (q, q) of a (B, q) feature.

    The accumulators are non-persistent buffers (checkpoints carry only what scoring needs);
    :meth:`reduced_class_moments` all-reduces them across DDP ranks, a rank that saw no batch
    joining with zeros.
    """

    requires_fit = True
    #: also stream Σ x xᵀ (a covariance needs it; class means alone do not).
    second_moment: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("class_count", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("class_sum", torch.zeros(0, 0, dtype=f64), persistent=False)
        if self.second_moment:
            self.register_buffer("outer", torch.zeros(0, 0, dtype=f64), persistent=False)

    def _allocate(self, n_classes: int, q: int, device: torch.device) -> None:
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.class_count = torch.zeros(n_classes, **kw)
        self.class_sum = torch.zeros(n_classes, q, **kw)
        if self.second_moment:
            self.outer = torch.zeros(q, q, **kw)

    def reset(self) -> None:
        self._allocate(0, 0, self.fitted.device)
        self.fitted.fill_(False)

    def add_class_moments(
        self, out: BackboneOutput, target: Tensor, f: Tensor, *, correct_only: bool = False
    ) -> None:
        """Add one batch of features ``f`` (B, q) to the sums of their classes ``target``.

        ``correct_only``: only the samples whose logits' argmax is their label. ``f`` is the
        :func:`~lightning_ood.detectors.mahalanobis.batch_gram` memo key: pass the backbone's
        own tensor so detectors fitted together share one Σ x xᵀ product."""
        y = target.reshape(-1).long().to(f.device)
        n_classes = out.logits.shape[1]
        check_labelled(self.name, f, y, n_classes)
        if self.class_sum.numel() == 0:
            self._allocate(n_classes, f.shape[1], f.device)
        elif self.class_sum.shape != (n_classes, f.shape[1]):
            raise ValueError(
                f"{self.name}: (classes, features) changed from {tuple(self.class_sum.shape)} "
                f"to {(n_classes, f.shape[1])} during fitting"
            )
        if correct_only:
            keep = out.logits.detach().argmax(dim=1) == y
            f, y = f[keep], y[keep]
        fd = f.detach().double()
        self.class_count += torch.bincount(y, minlength=n_classes).to(fd)
        self.class_sum.index_add_(0, y, fd)
        if self.second_moment:
            self.outer += batch_gram(f, fd)

    def reduced_class_moments(
        self, model: OODBackbone, reducer: Reducer
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """All-rank (counts, sums, Σ x xᵀ or None without ``second_moment``)."""
        if self.class_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            self._allocate(model.num_classes, model.num_features, self.fitted.device)
        counts = reducer.sum(self.class_count.clone())
        sums = reducer.sum(self.class_sum.clone())
        outer = reducer.sum(self.outer.clone()) if self.second_moment else None
        return counts, sums, outer

    def checked_features(self, features: Tensor, fitted: Tensor) -> Tensor:
        """``features`` after refusing an unfitted detector or a width other than that of the
        fitted class statistics ``fitted`` (L, q)."""
        self.check_fitted()
        if features.dim() != 2 or features.shape[1] != fitted.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {fitted.shape[1]}), got "
                f"{tuple(features.shape)}; was the detector fitted on another backbone?"
            )
        return features

    def tied_gaussian(
        self, model: OODBackbone, reducer: Reducer
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """All-rank (counts, sums, Σ x xᵀ, class means μ, tied covariance Σ); refuses an empty
        fit or an empty class."""
        counts, sums, outer = self.reduced_class_moments(model, reducer)
        assert outer is not None, f"{self.name}: tied_gaussian needs second_moment"
        if float(counts.sum()) == 0:
            raise RuntimeError(f"{self.name}: finalize() before any update(); no training data")
        require_every_class(self.name, counts)
        means, cov = tied_covariance(counts, sums, outer)
        return counts, sums, outer, means, cov


__all__ = [
    "ClassMomentsDetector",
    "batch_gram",
    "check_labelled",
    "require_every_class",
    "tied_covariance",
]
