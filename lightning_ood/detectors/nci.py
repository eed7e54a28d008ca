"""NCI (Liu & Qin, CVPR 2025, arXiv:2311.01479, "Detecting Out-of-Distribution through the Lens
of Neural Collapse"): proximity of the centred feature to the predicted class's weight vector,
plus a feature-norm filter.

The training feature mean and the head copy come from
:class:`~lightning_ood.detectors.linear_head.MeanHeadDetector` (shared with DICE and fDBD);
:func:`check_flag` is shared with fDBD and GradNorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, in_range
from lightning_ood.detectors.linear_head import MeanHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


def check_flag(name: str, value: Any, owner: str) -> bool:
    """Validate a boolean hyperparameter (a YAML ``"false"`` string would be truthy); an
    :data:`~lightning_ood.detectors.hparams.Check`."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: hyperparameter {name}={value!r} must be true or false")
    return value


def safe_norm(x: Tensor) -> Tensor:
    """Row L2 norms of ``x`` (B, q), with 0 raised to the dtype's smallest normal number so that
    a feature exactly at the centre divides to 0 instead of NaN (it only changes that case)."""
    return x.norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)


@register_detector
class NCI(MeanHeadDetector):
    """NCI: ``w_ŷ·(h − μ_G) / ||h − μ_G||_2 + α ||h||_1``; higher = more in-distribution.

    * ``μ_G``: the global centre, the mean penultimate feature of the training set (all
      classes; a streaming pass of sums reduced across ranks);
    * ``ŷ = argmax(W h + b)``, the predicted class, and ``w_ŷ`` its row of the head;
    * the first term, the paper's pScore, measures how close the centred feature lies to the
      predicted class's weight vector (its Neural-Collapse observation: centred ID features
      align with the class weight vectors); the second, the L1 filter, rewards features far
      from the origin (ID features expand into a simplex ETF, OOD ones stay near 0).

    The formula is the authors' code: their repository (litianliu/NCI-OOD) points to OpenOOD
    v1.5's ``postprocessors/nci_postprocessor.py``: ``sum(w[pred] * (feature - mean)) /
    norm(feature - mean) + alpha * norm(feature, p=1)``. That projection is the cosine
    similarity the paper describes scaled by ``||w_ŷ||``, the same for every class when the
    weights are equinorm (Neural Collapse NC2). ``cosine=True`` divides by ``||w_ŷ||_2``, the
    plain cosine. pytorch-ood 0.4.0's NCI computes the default formula and returns its
    negation (higher = more OOD). A feature exactly at ``μ_G`` gets pScore 0, not NaN.

    ``update`` only sums features; both hyperparameters enter :meth:`score` only.
    """

    kind = "nci"
    #: OpenOOD v1.5 ``nci.yml`` sweep (``alpha_list``).
    alpha = HParam(
        1e-4,
        in_range(0.0),
        search=(1e-4, 1e-3, 1e-2, 1e-1),
        stage="score",
        doc="weight α >= 0 of the L1 norm filter (1e-4: OpenOOD v1.5's nci.yml)",
    )
    cosine = HParam(
        False,
        check_flag,
        stage="score",
        doc="divide the projection by ||w_ŷ||_2 (plain cosine; default: the authors' projection)",
    )

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Copy the head and reduce the training feature mean μ_G."""
        self._finalize_mean(model, reducer)
        self.fitted.fill_(True)

    def proximity(self, h: Tensor) -> Tensor:
        """pScore ``w_ŷ·(h − μ_G) / ||h − μ_G||`` (over ``||w_ŷ||`` too with ``cosine``), (B,)."""
        pred = (h @ self.weight.T + self.bias).argmax(dim=1)
        w = self.weight[pred]  # (B, q)
        z = self._centred(h)
        p = (w * z).sum(dim=1) / safe_norm(z)
        if self.cosine:
            p = p / safe_norm(w)
        return p

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features)
        return self.proximity(h) + self.alpha * h.abs().sum(dim=1)


__all__ = ["NCI", "check_flag", "safe_norm"]
