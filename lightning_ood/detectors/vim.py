"""ViM, Virtual-logit Matching (Wang et al., CVPR 2022, "ViM: Out-Of-Distribution with
Virtual-logit Matching").

Paper Sec. 3: features are taken relative to the origin u = -W⁺b; the principal
subspace P is spanned by the top-D eigenvectors of the (uncentred) covariance of the training
features about u; the residual ``x^{P⊥}`` is what P does not explain. The virtual logit is
``α‖x^{P⊥}‖`` with ``α = mean_i max_j l_ij / mean_i ‖x_i^{P⊥}‖`` over training samples,
and ViM is the softmax probability of the virtual logit among the logits; the equivalent
monotone score used by the authors' code, OpenOOD and pytorch-ood (negated there) is
``logsumexp(l(x)) - α‖x^{P⊥}‖``: energy minus virtual logit (higher = more ID).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import (
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
)
from lightning_ood.detectors.hparams import HParam, integer, optional
from lightning_ood.detectors.knn import (
    check_layout,
    global_positions,
    seeded_uniform_at,
    stream_layout,
)
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


def default_dim(q: int) -> int:
    """The authors' principal dimension D for feature width q (``benchmark.py`` of
    github.com/haoqiwang/vim): 1000 if q >= 2048, 512 if q >= 768, else q // 2."""
    if q >= 2048:
        return 1000
    if q >= 768:
        return 512
    return q // 2


#: A mean training residual below this fraction of the mean feature norm (about u) is float
#: rounding: the features span no more than the principal subspace (e.g. dim >= the number of
#: live ReLU units), and α = mean max-logit / residual would amplify rounding noise ~1e12-fold.
_ROUNDING = 1e-6


def _bottom(prio: Tensor, pos: Tensor, m: int) -> Tensor:
    """Indices of the ``m`` smallest priorities (ties by position), in position order: the
    same rows in the same order however the candidates were split over batches and ranks."""
    by_pos = torch.sort(pos).indices
    chosen = by_pos[torch.sort(prio[by_pos], stable=True).indices[:m]]
    return chosen[torch.sort(pos[chosen]).indices]


def residual_basis(outer: Tensor, total: Tensor, n: Tensor, origin: Tensor, dim: int) -> Tensor:
    """The q - D eigenvectors of least eigenvalue of the uncentred covariance about ``origin``,
    (q, q - D) float64, from the sums Σxxᵀ (``outer``), Σx (``total``) and the count ``n``:
    ``C = (Σxxᵀ - s uᵀ - u sᵀ)/n + u uᵀ`` (sklearn ``EmpiricalCovariance(assume_centered=True)``
    of h - u, as ViM's reference code)."""
    u = origin.double()
    cov = (outer - torch.outer(total, u) - torch.outer(u, total)) / n + torch.outer(u, u)
    _, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))  # ascending eigenvalues
    return vecs[:, : u.shape[0] - dim].contiguous()


class FeatureMomentsDetector(LinearHeadDetector):
    """Linear-head detectors fitted on the float64 Σx, Σxxᵀ and count N of the penultimate
    features (ViM, Residual): :func:`residual_basis` needs only these sums.

    The sums are non-persistent buffers (checkpoints carry only what scoring needs), added in
    place in stream order (the sums, hence the basis, do not depend on the batching) and
    all-reduced across DDP ranks by :meth:`reduced_moments`.
    """

    #: who chose the default principal dimension, for the refusal of a bad ``dim``.
    _default_dim_by: ClassVar[str] = "the authors'"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("count", torch.zeros((), dtype=f64), persistent=False)
        self.register_buffer("feature_sum", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("outer", torch.zeros(0, 0, dtype=f64), persistent=False)

    def reset(self) -> None:
        dev = self.fitted.device
        self.count = torch.zeros((), dtype=torch.float64, device=dev)
        self.feature_sum = torch.zeros(0, dtype=torch.float64, device=dev)
        self.outer = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def add_moments(self, out: BackboneOutput) -> Tensor:
        """Add the batch's Σx, Σxxᵀ and N (float64); returns the detached features (B, q)."""
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
        return h

    def resolve_dim(self, q: int) -> int:
        """The principal dimension D (``dim``, or :func:`default_dim`); 1 <= D < q or
        :class:`InvalidConfiguration` (tuning skips the candidate)."""
        d = default_dim(q) if self.dim is None else self.dim
        if not 1 <= d < q:
            raise InvalidConfiguration(
                f"{self.name}: dim={d} must lie in [1, {q - 1}] for features of width q={q} "
                "(the residual outside the principal subspace must not be empty); lower dim "
                f"or use dim: null for {self._default_dim_by} default"
            )
        return d

    def reduced_moments(
        self, reducer: Reducer, q: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All-rank (N, Σx, Σxxᵀ); a rank that saw no batch joins with zeros of width q."""
        if self.feature_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            self.feature_sum = torch.zeros(q, dtype=torch.float64, device=device)
            self.outer = torch.zeros(q, q, dtype=torch.float64, device=device)
        n = reducer.sum(self.count.clone())
        if float(n) == 0:
            raise RuntimeError(f"{self.name}: finalize() before any update(); no training data")
        return n, reducer.sum(self.feature_sum.clone()), reducer.sum(self.outer.clone())


@register_detector
class ViM(FeatureMomentsDetector):
    """ViM: energy minus the α-scaled norm of the feature residual outside the principal
    subspace.

    Streaming fit: ``update`` adds float64 Σx, Σxxᵀ, the count and Σ max-logit (exact over the
    whole training set), so the covariance about u (known only once the head is copied in
    ``finalize``) is ``(Σxxᵀ - s uᵀ - u sᵀ + N u uᵀ)/N`` with s = Σx, and the numerator of α is
    exact. The denominator of α, the mean residual norm, is a mean of square roots and cannot
    come from second moments; it is computed on a seeded uniform subsample of at most
    ``max_samples // q`` training rows (the rows with the smallest
    :func:`~lightning_ood.detectors.knn.seeded_uniform_at` priority of their position in the
    training set, ties by position), which is the whole training set, hence exact, when it
    fits (CIFAR: 50,000 x 342 features are 17M values, under the default 20M). The sample does
    not depend on the batching nor on the world size: under DDP rank ``r`` of ``w`` numbers its
    ``p``-th sample ``r + p * w`` (its EvalShardedSampler shard, see
    :func:`~lightning_ood.detectors.knn.stream_layout`), keeps its own bottom-m, and
    ``finalize`` keeps the m smallest priorities of their union and averages the residual norms
    in training-set order, as one process does.

    ``update`` accumulates sums and the α subsample; D only enters ``finalize``.
    """

    kind: ClassVar[str] = "vim"
    #: OpenOOD v1.5 ``configs/postprocessors/vim.yml``: ``dim_list: [256, 1000]`` (a candidate
    #: >= q is refused at finalize: use it for backbones with q > 1000, e.g. ResNet-50).
    dim = HParam(
        None,
        optional(integer(1)),
        search=(256, 1000),
        stage="finalize",
        doc="principal-subspace dimension D, 1 <= D < q; None = default_dim (the authors' rule)",
    )
    max_samples = HParam(
        20_000_000,
        integer(1),
        doc="cap on the feature values (rows x q) kept to estimate the mean residual norm of α",
    )
    seed = HParam(0, integer(0), doc="seed of that subsample")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("max_logit_sum", torch.zeros((), dtype=f64), persistent=False)
        self.register_buffer("origin", torch.zeros(0, dtype=f64))  # u = -W⁺b, (q,)
        self.register_buffer("residual_basis", torch.zeros(0, 0, dtype=f64))  # (q, q - D)
        self.register_buffer("alpha", torch.zeros((), dtype=f64))
        self.register_buffer("principal_dim", torch.zeros((), dtype=torch.long))  # D used
        self._sample: list[tuple[Tensor, Tensor, Tensor]] = []  # (priorities, rows, positions)
        self._sample_rows = 0
        self._cutoff = float("inf")
        self._seen = 0
        self._layout = stream_layout()

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        dev = self.fitted.device
        self.max_logit_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self._sample, self._sample_rows, self._cutoff, self._seen = [], 0, float("inf"), 0
        self._layout = stream_layout()

    def _capacity(self, q: int) -> int:
        return max(1, self.max_samples // q)

    def _compact(self, m: int) -> None:
        """Keep the ``m`` rows of smallest priority (ties by position), in position order."""
        prio = torch.cat([p for p, _, _ in self._sample])
        rows = torch.cat([r for _, r, _ in self._sample])
        pos = torch.cat([i for _, _, i in self._sample])
        if prio.numel() > m:
            order = _bottom(prio, pos, m)
            prio, rows, pos = prio[order], rows[order], pos[order]
            self._cutoff = float(prio.max())
        self._sample = [(prio, rows, pos)]
        self._sample_rows = prio.numel()

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add Σx, Σxxᵀ, N and Σ max-logit (float64) and offer the rows to the α sample."""
        h = self.add_moments(out)
        if h.shape[0]:
            self.max_logit_sum += out.logits.detach().double().max(dim=1).values.sum()
        pos = global_positions(self._seen, h.shape[0], self._layout, h.device)
        prio = seeded_uniform_at(pos, self.seed)
        self._seen += h.shape[0]
        keep = prio < self._cutoff
        self._sample.append((prio[keep], h[keep], pos[keep]))  # boolean indexing copies
        self._sample_rows += int(keep.sum())
        m = self._capacity(h.shape[1])
        if self._sample_rows > 2 * m:
            self._compact(m)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Reduce the sums and the α sample; derive u, the residual basis and α."""
        reducer = reducer or Reducer()
        self._copy_head(model)
        w, b = self.weight.double(), self.bias.double()
        q = w.shape[1]
        dev = w.device
        d = self.resolve_dim(q)
        n, s, outer = self.reduced_moments(reducer, q, dev)
        max_logit = reducer.sum(self.max_logit_sum.clone()) / n
        u = -(torch.linalg.pinv(w) @ b)
        basis = residual_basis(outer, s, n, u, d)
        # α's denominator on the (all-rank) bottom-m sample.
        check_layout(reducer, self._layout[1], self.name, dev)
        if self._sample:
            self._compact(self._capacity(q))
            prio, rows, pos = self._sample[0]
        else:
            prio = torch.zeros(0, dtype=torch.float64, device=dev)
            rows = torch.zeros(0, q, dtype=self.weight.dtype, device=dev)
            pos = torch.zeros(0, dtype=torch.int64, device=dev)
        prio, rows, pos = reducer.cat(prio), reducer.cat(rows), reducer.cat(pos)
        rows = rows[_bottom(prio, pos, self._capacity(q))]  # every rank's m smallest
        centred = rows.double() - u
        residual = (centred @ basis).norm(dim=1).mean()
        spread = centred.norm(dim=1).mean()
        if not bool(torch.isfinite(residual)) or float(residual) <= _ROUNDING * float(spread):
            raise InvalidConfiguration(
                f"{self.name}: the training features have no residual outside the principal "
                f"subspace of dimension {d} (mean residual norm {float(residual):g}, "
                f"{float(residual) / max(float(spread), 1e-300):.1e} of their mean norm about "
                "the origin u: float rounding, not signal); they span at most "
                f"{d} dimensions, so α would scale rounding noise into the score; lower dim"
            )
        self.origin = u
        self.residual_basis = basis
        self.alpha = max_logit / residual
        self.principal_dim = torch.tensor(d, device=dev)
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def virtual_logit(self, features: Tensor) -> Tensor:
        """α‖x^{P⊥}‖, (B,) float64."""
        return self._virtual_logit(self._check_features(features).double())

    def _virtual_logit(self, h: Tensor) -> Tensor:
        """α‖x^{P⊥}‖ of features already checked and in float64 (one conversion per batch).
        The buffers are read in float64 whatever their dtype (a module moved with
        ``.to(torch.float32)`` holds them in float32)."""
        residual = (h - self.origin.double()) @ self.residual_basis.double()
        return self.alpha.double() * residual.norm(dim=1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features).double()
        energy = torch.logsumexp(h @ self.weight.double().T + self.bias.double(), dim=1)
        return energy - self._virtual_logit(h)


__all__ = ["FeatureMomentsDetector", "ViM", "default_dim", "residual_basis"]
