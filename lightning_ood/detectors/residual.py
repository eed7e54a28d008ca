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

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, integer, optional
from lightning_ood.detectors.registry import register_detector
from lightning_ood.detectors.vim import FeatureMomentsDetector, residual_basis
from lightning_ood.models.base import BackboneOutput, OODBackbone


@register_detector
class Residual(FeatureMomentsDetector):
    """Minus the norm of the feature residual outside ViM's principal subspace.

    Streaming fit: ``update`` adds float64 Σx, Σxxᵀ and the count (reduced across DDP ranks in
    ``finalize``), so the covariance about u, known only once the head is copied, is exact
    over the whole training set in one pass (:func:`residual_basis`). Buffers ``origin`` (u)
    and ``residual_basis`` (q, q - D) are read in float64 whatever their dtype.
    """

    kind = "residual"
    _default_dim_by = "ViM's"
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
        self.register_buffer("origin", torch.zeros(0, dtype=f64))  # u = -W⁺b, (q,)
        self.register_buffer("residual_basis", torch.zeros(0, 0, dtype=f64))  # (q, q - D)
        self.register_buffer("principal_dim", torch.zeros((), dtype=torch.long))  # D used

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add Σx, Σxxᵀ and N (float64), in stream order."""
        self.add_moments(out)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Reduce the sums; derive u and the residual basis."""
        reducer = reducer or Reducer()
        self._copy_head(model)
        w, b = self.weight.double(), self.bias.double()
        q, dev = w.shape[1], w.device
        d = self.resolve_dim(q)
        n, s, outer = self.reduced_moments(reducer, q, dev)
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
