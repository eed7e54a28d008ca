"""GMM: the log-likelihood of the penultimate features under a Gaussian mixture fitted to the
training features (OpenOOD v1.5 ``gmm_postprocessor.py``; pytorch-ood ``GMM``).

By default the mixture is class-conditional: each class k gets its own mixture of
``n_components`` Gaussians fitted by EM to its training features, weighted by the class
frequency π_k, and the score is the log-density of the whole mixture,

    S(x) = log Σ_k π_k Σ_c w_kc N(P h | μ_kc, Σ_kc),

with P an optional PCA projection to ``reduce_dim`` dimensions (higher = more ID). With one
component per class this is pytorch-ood's ``GMM``; with ``per_class: false`` it is OpenOOD's
label-free mixture (its CIFAR setting: 50 tied components on 50 PCA dimensions), whose score
omits the Gaussian normalising constant (a constant for tied covariances: the same ranking);
docs/methods.md#gmm.

EM needs the training features themselves: fitting keeps them as a bank with KNN's conventions
(a seeded ``bank_fraction`` by training-set position, gathered across ranks in that order), and
``finalize`` runs scikit-learn's ``GaussianMixture`` (CPU, float64, ``random_state=seed``) on
it, identically on every rank. Only the mixture enters the buffers (means, precision Cholesky
factors, log-weights, the projection), scoring is pure torch, and the bank is dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_ood.detectors import knn
from lightning_ood.detectors.base import (
    Detector,
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
)
from lightning_ood.detectors.hparams import HParam, boolean, choice, in_range, integer, optional
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

COVARIANCES = ("full", "tied", "diag")


def pca_projection(x: Tensor, dim: int) -> Tensor:
    """The top-``dim`` principal axes of the rows of ``x`` (N, q), as columns (q, dim), float64
    (sklearn ``PCA(dim).components_.T`` up to the signs of the axes). Each axis is signed so
    that its largest-magnitude entry is positive: a solver's arbitrary sign cannot flip it
    between ranks or runs."""
    xd = x.double()
    centred = xd - xd.mean(dim=0)
    _, vecs = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    axes = vecs.flip(1)[:, :dim]
    lead = axes.gather(0, axes.abs().argmax(dim=0, keepdim=True))
    return (axes * torch.where(lead < 0, -1.0, 1.0)).contiguous()


def fit_mixture(
    x: np.ndarray, n_components: int, covariance_type: str, reg_covar: float, max_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """EM by scikit-learn on ``x`` (N, d): ``(weights (C,), means (C, d), precision Cholesky
    factors (C, d, d))``, every covariance type brought to per-component full factors."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(
        n_components=n_components,
        covariance_type=covariance_type,
        reg_covar=reg_covar,
        max_iter=max_iter,
        random_state=seed,
    ).fit(x)
    chol = gm.precisions_cholesky_
    d = x.shape[1]
    if covariance_type == "tied":
        chol = np.broadcast_to(chol, (n_components, d, d))
    elif covariance_type == "diag":
        chol = chol[:, :, None] * np.eye(d)
    return gm.weights_, gm.means_, np.ascontiguousarray(chol)


def mixture_log_density(
    z: Tensor, log_weights: Tensor, means: Tensor, prec_chol: Tensor
) -> Tensor:  # fmt: skip
    """log Σ_c exp(log w_c) N(z | μ_c, (L_c L_cᵀ)⁻¹) per row of ``z`` (B, d), float64:
    ``log N = -½‖(z - μ_c)ᵀ L_c‖² + Σ log diag L_c - d/2 log 2π`` (sklearn's form)."""
    zl = torch.einsum("bd,cde->bce", z, prec_chol)
    ml = torch.einsum("cd,cde->ce", means, prec_chol)
    maha = (zl - ml).square().sum(dim=2)  # (B, C)
    log_det = prec_chol.diagonal(dim1=1, dim2=2).log().sum(dim=1)
    d = z.shape[1]
    log_n = -0.5 * maha + log_det - 0.5 * d * math.log(2.0 * math.pi)
    return torch.logsumexp(log_weights + log_n, dim=1)


@register_detector
class GMM(Detector):
    """Log-density of the (projected) features under a Gaussian mixture fitted by EM.

    Buffers: ``projection`` (q, d; the identity without ``reduce_dim``), ``means`` (K, d),
    ``prec_chol`` (K, d, d) and ``log_weights`` (K,), K = ``n_components`` x classes (or
    ``n_components`` with ``per_class: false``); the mixture costs K·d² values and K·d² work
    per scored sample, the fit O(max_iter · N · K · d²) on the CPU.
    """

    kind = "gmm"
    requires_fit = True
    n_components = HParam(
        1,
        integer(1),
        search=(1, 2, 4),
        stage="finalize",
        doc="Gaussians per class (per_class) or in all (OpenOOD's CIFAR penultimate setting: 50)",
    )
    per_class = HParam(
        True,
        boolean(),
        stage="finalize",
        doc="one mixture per class weighted by its frequency (pytorch-ood); false: one "
        "label-free mixture over all training features (OpenOOD)",
    )
    covariance_type = HParam(
        "full",
        choice(*COVARIANCES),
        stage="finalize",
        doc="sklearn covariance_type: full (pytorch-ood), tied (OpenOOD) or diag",
    )
    reduce_dim = HParam(
        None,
        optional(integer(1)),
        stage="finalize",
        doc="PCA dimensions the features are projected to first (OpenOOD: 50); None: none",
    )
    reg_covar = HParam(
        1e-6, in_range(0.0), stage="finalize", doc="added to covariance diagonals (sklearn)"
    )
    max_iter = HParam(100, integer(1), stage="finalize", doc="EM iterations at most (sklearn)")
    bank_fraction = HParam(
        1.0,
        in_range(0.0, 1.0, low_open=True, high_open=False),
        doc="fraction of training samples kept for EM, in (0, 1] (KNN's seeded sampling)",
    )
    seed = HParam(0, integer(0), doc="seed of the bank sampling and of EM's initialisation")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("projection", torch.zeros(0, 0, dtype=f64))  # P, (q, d)
        self.register_buffer("means", torch.zeros(0, 0, dtype=f64))  # μ, (K, d)
        self.register_buffer("prec_chol", torch.zeros(0, 0, 0, dtype=f64))  # L, (K, d, d)
        self.register_buffer("log_weights", torch.zeros(0, dtype=f64))  # log π_k w_kc, (K,)
        self._rows: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._positions: list[Tensor] = []
        self._seen = 0
        self._layout = knn.stream_layout()

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        self._rows, self._labels, self._positions, self._seen = [], [], [], 0
        self._layout = knn.stream_layout()
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Keep the batch's sampled feature rows, labels and training-set positions."""
        h = out.features.detach()
        y = target.reshape(-1).long().to(h.device)
        if h.dim() != 2 or h.shape[0] != y.shape[0]:
            raise ValueError(
                f"{self.name}: features {tuple(h.shape)} and targets {tuple(y.shape)} must be "
                "(B, q) and (B,)"
            )
        if self._rows and h.shape[1] != self._rows[0].shape[1]:
            raise ValueError(
                f"{self.name}: feature width changed from {self._rows[0].shape[1]} to "
                f"{h.shape[1]} during fitting"
            )
        pos = knn.global_positions(self._seen, h.shape[0], self._layout, h.device)
        self._seen += h.shape[0]
        keep = knn.seeded_uniform_at(pos, self.seed) < self.bank_fraction
        self._rows.append(h[keep])  # boolean indexing copies: no batch is aliased
        self._labels.append(y[keep])
        self._positions.append(pos[keep])

    def _bank(self, model: OODBackbone, reducer: Reducer) -> tuple[Tensor, Tensor]:
        """Every rank's kept rows and labels, in training-set order."""
        dev = self.fitted.device
        if self._rows:
            rows, labels = torch.cat(self._rows), torch.cat(self._labels)
            pos = torch.cat(self._positions)
        else:  # a rank that saw no batch still joins the gathers
            rows = torch.zeros(0, model.num_features, device=dev)
            labels = torch.zeros(0, dtype=torch.long, device=dev)
            pos = torch.zeros(0, dtype=torch.long, device=dev)
        self._rows, self._labels, self._positions = [rows], [labels], [pos]  # grid: again
        knn.check_layout(reducer, self._layout[1], self.name, rows.device)
        rows, labels, pos = reducer.cat(rows), reducer.cat(labels), reducer.cat(pos)
        order = torch.sort(pos).indices
        return rows[order], labels[order]

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Gather the bank, project it, run EM (per class or once), store the mixture."""
        rows, labels = self._bank(model, reducer or Reducer())
        if rows.shape[0] == 0:
            raise RuntimeError(
                f"{self.name}: no training features were kept (seen {self._seen} on this "
                f"rank, bank_fraction={self.bank_fraction:g}); fit on the training set"
            )
        q = rows.shape[1]
        if self.reduce_dim is not None and self.reduce_dim > q:
            raise InvalidConfiguration(
                f"{self.name}: reduce_dim={self.reduce_dim} exceeds the feature width {q}; "
                "lower it or use reduce_dim: null"
            )
        proj = (
            torch.eye(q, dtype=torch.float64, device=rows.device)
            if self.reduce_dim is None
            else pca_projection(rows, self.reduce_dim)
        )
        z = (rows.double() @ proj).cpu().numpy()
        y = labels.cpu().numpy()
        groups = (
            [(int(k), y == k) for k in range(model.num_classes)]
            if self.per_class
            else [(-1, np.ones(len(y), dtype=bool))]
        )
        weights, means, chols = [], [], []
        for k, mask in groups:
            n = int(mask.sum())
            if n < max(2, self.n_components):
                which = f"class {k} has" if k >= 0 else "the bank has"
                raise InvalidConfiguration(
                    f"{self.name}: {which} {n} training features, fewer than "
                    f"max(2, n_components={self.n_components}) that EM needs; lower "
                    "n_components, raise bank_fraction, or use per_class: false"
                )
            w, mu, chol = fit_mixture(z[mask], self.n_components, self.covariance_type,
                                      self.reg_covar, self.max_iter, self.seed)  # fmt: skip
            weights.append(w * n / len(y))  # π_k w_kc
            means.append(mu)
            chols.append(chol)
        dev = self.fitted.device
        self.projection = proj.to(dev)
        self.means = torch.from_numpy(np.concatenate(means)).to(dev)
        self.prec_chol = torch.from_numpy(np.concatenate(chols)).to(dev)
        self.log_weights = torch.from_numpy(np.log(np.concatenate(weights))).to(dev)
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        self.check_fitted()
        h = out.features
        q = self.projection.shape[0]
        if h.dim() != 2 or h.shape[1] != q:
            raise ValueError(
                f"{self.name}: features must have shape (B, {q}), got {tuple(h.shape)}; was "
                "the detector fitted on another backbone?"
            )
        z = h.double() @ self.projection.double()
        return mixture_log_density(
            z, self.log_weights.double(), self.means.double(), self.prec_chol.double()
        )


__all__ = ["COVARIANCES", "GMM", "fit_mixture", "mixture_log_density", "pca_projection"]
