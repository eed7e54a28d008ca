"""Residual: ViM's feature residual alone (Wang et al., CVPR 2022, "ViM: Out-Of-Distribution
with Virtual-logit Matching", §3; OpenOOD v1.5 ``residual_postprocessor.py``).

The training features, measured from the origin u = -W⁺b, span a principal subspace P of
dimension D (top-D eigenvectors of their uncentred covariance about u); the score is minus
the norm of what P does not explain, ``-‖(I - P)(h - u)‖`` (higher = more ID). ViM adds the
energy and scales this norm by α; the residual alone needs neither (docs/methods.md#residual).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import InvalidConfiguration, OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, integer, optional
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.detectors.vim import default_dim
from lightning_ood.models.base import BackboneOutput, OODBackbone


def residual_basis(outer: Tensor, total: Tensor, n: Tensor, origin: Tensor, dim: int) -> Tensor:
    """The q - D eigenvectors of least eigenvalue of the uncentred covariance about ``origin``,
    (q, q - D) float64, from the sums Σxxᵀ (``outer``), Σx (``total``) and the count ``n``:
    ``C = (Σxxᵀ - s uᵀ - u sᵀ)/n + u uᵀ`` (sklearn ``EmpiricalCovariance(assume_centered=True)``
    of h - u, as ViM's reference code)."""
    u = origin.double()
    cov = (outer - torch.outer(total, u) - torch.outer(u, total)) / n + torch.outer(u, u)
    _, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))  # ascending eigenvalues
    return vecs[:, : u.shape[0] - dim].contiguous()


@register_detector
class Residual(LinearHeadDetector):
    """Minus the norm of the feature residual outside ViM's principal subspace.

    Streaming fit: ``update`` adds float64 Σx, Σxxᵀ and the count (reduced across DDP ranks in
    ``finalize``), so the covariance about u, known only once the head is copied, is exact
    over the whole training set in one pass (:func:`residual_basis`). Buffers ``origin`` (u)
    and ``residual_basis`` (q, q - D) are read in float64 whatever their dtype.
    """

    kind = "residual"
    #: OpenOOD v1.5 ``residual.yml`` fixes D = 512; ViM's sweep (256, 1000) besides. A
    #: candidate >= q is refused at finalize (InvalidConfiguration: tuning skips it).
    dim = HParam(
        None,
        optional(integer(1)),
        search=(256, 512, 1000),
        stage="finalize",
        doc="principal-subspace dimension D, 1 <= D < q; None: ViM's default_dim(q)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("count", torch.zeros((), dtype=f64), persistent=False)
        self.register_buffer("feature_sum", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("outer", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("origin", torch.zeros(0, dtype=f64))  # u = -W⁺b, (q,)
        self.register_buffer("residual_basis", torch.zeros(0, 0, dtype=f64))  # (q, q - D)
        self.register_buffer("principal_dim", torch.zeros((), dtype=torch.long))  # D used

    def reset(self) -> None:
        dev = self.fitted.device
        self.count = torch.zeros((), dtype=torch.float64, device=dev)
        self.feature_sum = torch.zeros(0, dtype=torch.float64, device=dev)
        self.outer = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add Σx, Σxxᵀ and N (float64), in stream order."""
        h = out.features.detach()
        if h.dim() != 2:
            raise ValueError(f"{self.name}: features must be (B, q), got {tuple(h.shape)}")
        hd = h.double()
        if self.feature_sum.numel() == 0:
            self.feature_sum = hd.new_zeros(h.shape[1])
            self.outer = hd.new_zeros(h.shape[1], h.shape[1])
        elif self.feature_sum.shape[0] != h.shape[1]:
            raise ValueError(
                f"{self.name}: feature width changed from {self.feature_sum.shape[0]} to "
                f"{h.shape[1]} during fitting"
            )
        self.count += h.shape[0]
        self.feature_sum += hd.sum(dim=0)
        self.outer.addmm_(hd.T, hd)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Reduce the sums; derive u and the residual basis."""
        reducer = reducer or Reducer()
        self._copy_head(model)
        w, b = self.weight.double(), self.bias.double()
        q, dev = w.shape[1], w.device
        if self.feature_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            self.feature_sum = torch.zeros(q, dtype=torch.float64, device=dev)
            self.outer = torch.zeros(q, q, dtype=torch.float64, device=dev)
        d = default_dim(q) if self.dim is None else self.dim
        if not 1 <= d < q:
            raise InvalidConfiguration(
                f"{self.name}: dim={d} must lie in [1, {q - 1}] for features of width q={q} "
                "(the residual outside the principal subspace must not be empty); lower dim "
                "or use dim: null for ViM's default"
            )
        n = reducer.sum(self.count.clone())
        if float(n) == 0:
            raise RuntimeError(f"{self.name}: finalize() before any update(); no training data")
        s = reducer.sum(self.feature_sum.clone())
        outer = reducer.sum(self.outer.clone())
        u = -(torch.linalg.pinv(w) @ b)
        self.origin = u
        self.residual_basis = residual_basis(outer, s, n, u, d)
        self.principal_dim = torch.tensor(d, device=dev)
        self.fitted.fill_(True)

    def residual_norm(self, features: Tensor) -> Tensor:
        """‖(I - P)(h - u)‖ per row, (B,) float64."""
        h = self._check_features(features).double()
        return ((h - self.origin.double()) @ self.residual_basis.double()).norm(dim=1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.residual_norm(out.features)


__all__ = ["Residual", "residual_basis"]
