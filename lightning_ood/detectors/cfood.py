"""CFOOD (Angiulli, Fassetti & Zupi, SISAP 2025, "CF-OOD: Concentration-Free Density
Estimation for Reliable Out-of-Distribution Detection"): the Concentration Free Outlier Factor
(CFOF, Angiulli 2017) of a test feature against a reference set of training features.

CFOF measures how many reverse neighbours a point has: the CFOF score of x is the smallest
neighbourhood size κ (a fraction of the n reference points) such that x falls within the
κ·n nearest neighbours of at least a fraction ϱ of the reference points,

    CFOF(x) = min { κ : |{ y : ‖x - y‖ <= d_κ(y) }| >= ϱ · n },

d_κ(y) the distance from y to its ⌊κn⌋-th nearest other reference point. Inliers are reverse
neighbours of many points at small κ; CFOF does not concentrate in high dimensions (the
point of the method). OpenOOD's ``cfood_postprocessor.py`` (the authors' integration)
evaluates κ on a fixed grid of 230 fractions in (0, 1), on L2-normalised features, with a
reference set of a random fraction ``alpha`` of the training features; the confidence is
-CFOF (higher = more ID). See docs/methods.md#cfood.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from lightning_ood.detectors.base import (
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
    exporting,
)
from lightning_ood.detectors.hparams import HParam, in_range
from lightning_ood.detectors.knn import BankDetector, normalize_rows
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: OpenOOD's κ grid: 100 steps in [0.001, 0.1], 81 in [0.105, 0.5], 49 in [0.51, 0.99].
KAPPA_GRID = np.concatenate(
    (np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49))
)


def kappa_positions(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid fractions κ kept for ``n`` reference points and their neighbour ranks
    ``int(κ·n - 1)`` (truncated as OpenOOD's ``astype(int)``), repeated ranks dropped."""
    pos = np.array(KAPPA_GRID * n - 1, dtype=int)
    keep = np.concatenate(([True], pos[:-1] < pos[1:]))
    return KAPPA_GRID[keep], pos[keep]


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """‖a_i - b_j‖² (A, B) in float64 through ‖a‖² + ‖b‖² - 2a·b, clamped at 0."""
    a, b = a.double(), b.double()
    sq = a.square().sum(dim=1)[:, None] + b.square().sum(dim=1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min(0.0)


def cfof(dist: Tensor, knn_dist: Tensor, kappa: Tensor, rho: float) -> Tensor:
    """CFOF of B queries from their squared distances ``dist`` (B, n) to the reference points
    and the reference points' neighbour distances ``knn_dist`` (n, K) at the grid fractions
    ``kappa`` (K,): the first κ_j whose count ``#{i : knn_dist[i, j] >= dist[b, i]} / n``
    reaches ``rho``, 1 where none does. (B,) float64."""
    n, num_k = knn_dist.shape
    knn_dist = knn_dist.to(dist.dtype)
    # knn_dist[i] ascends in j: the j with knn_dist[i, j] >= d form a suffix starting at
    # first[b, i] = #{j : knn_dist[i, j] < d[b, i]}
    if exporting():  # no searchsorted in ONNX: count by comparison (B x n x K booleans)
        first = (knn_dist[None] < dist[:, :, None]).sum(dim=2)  # (B, n)
    else:
        first = torch.searchsorted(knn_dist.contiguous(), dist.T.contiguous()).T  # (B, n)
    counts = torch.zeros(dist.shape[0], num_k + 1, dtype=torch.float64, device=dist.device)
    counts.scatter_add_(1, first, torch.ones_like(first, dtype=torch.float64))
    frac = counts[:, :num_k].cumsum(dim=1) / n
    hit = frac >= rho
    # the first hit, or index num_k (κ = 1) where there is none
    none = torch.full_like(hit[:, 0], num_k, dtype=torch.long)
    idx = torch.where(hit.any(dim=1), hit.double().argmax(dim=1), none)
    grid = torch.cat([kappa.double(), kappa.new_ones(1, dtype=torch.float64)])
    return grid[idx]


@register_detector
class CFOOD(BankDetector):
    """-CFOF of z = h/‖h‖ against a seeded fraction ``bank_fraction`` (OpenOOD's ``alpha``) of
    the normalised training features (docs/methods.md#cfood).

    ``finalize`` gathers the bank (:class:`~lightning_ood.detectors.knn.BankDetector`) and
    derives each reference point's squared distances to its neighbours at the grid's ranks,
    ``knn_dist`` (n, K), from an exact all-pairs computation in float64, chunked by rows
    (O(n²) time, O(bank_chunk · n) memory). Scoring is O(B · n · (q + log K)).
    """

    kind: ClassVar[str] = "cfood"
    #: OpenOOD's ``cfood.yml`` sweeps (alpha, k) over {0.1, 0.5, 1} x {0.001, 0.005, 0.01, 0.05}.
    bank_fraction = HParam(
        0.1, in_range(0.0, 1.0, low_open=True, high_open=False), search=(0.1, 0.5, 1.0),
        doc="alpha: fraction of training samples in the reference set, in (0, 1]",
    )  # fmt: skip
    rho = HParam(
        0.01, in_range(0.0, 1.0, low_open=True, high_open=False),
        search=(0.001, 0.005, 0.01, 0.05), stage="score",
        doc="ϱ (OpenOOD's k): fraction of reference points x must be a neighbour of",
    )  # fmt: skip
    # No top-k search: the bank's k and search backend do not apply.
    k: ClassVar[int] = 1  # type: ignore[assignment]
    backend: ClassVar[str] = "torch"  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("kappa", torch.zeros(0, dtype=torch.float64))  # (K,)
        self.register_buffer("knn_dist", torch.zeros(0, 0, dtype=torch.float64))  # (n, K)

    def bank_rows(self, out: BackboneOutput) -> Tensor:
        return normalize_rows(out.features)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        super().finalize(model, reducer)
        bank = self.bank
        n = bank.shape[0]
        if n < 2:
            raise InvalidConfiguration(
                f"{self.name}: CFOF needs at least 2 reference points, the bank holds {n}; "
                "raise bank_fraction or min_bank"
            )
        kappa, pos = kappa_positions(n)
        cols = torch.as_tensor(pos + 1, device=bank.device)  # + 1: skip the point itself
        rows = []
        for bs in range(0, n, self.bank_chunk):
            d = squared_distances(bank[bs : bs + self.bank_chunk], bank)
            rows.append(torch.sort(d, dim=1).values[:, cols])
        self.knn_dist = torch.cat(rows)
        self.kappa = torch.as_tensor(kappa, dtype=torch.float64, device=bank.device)

    def mark_unfitted(self) -> None:
        super().mark_unfitted()
        self.knn_dist = self.knn_dist.new_zeros(0, 0)

    def cfof(self, features: Tensor) -> Tensor:
        """CFOF of z = h/‖h‖ against the reference set, (B,) float64."""
        bank = self._require_bank()
        if features.dim() != 2 or features.shape[1] != bank.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {bank.shape[1]}), got "
                f"{tuple(features.shape)}; was the detector fitted on another backbone?"
            )
        z = normalize_rows(features)
        if exporting():
            return cfof(squared_distances(z, bank), self.knn_dist, self.kappa, self.rho)
        parts = [
            cfof(squared_distances(zc, bank), self.knn_dist, self.kappa, self.rho)
            for zc in z.split(self.query_chunk)
        ]
        return torch.cat(parts) if parts else z.new_zeros(0, dtype=torch.float64)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.cfof(out.features)


__all__ = ["CFOOD", "KAPPA_GRID", "cfof", "kappa_positions"]
