"""CORE, COnfidence + REsidual (Yang, Kim & Bahk, arXiv:2603.18290, 2026, "CORE: Robust
Out-of-Distribution Detection via Confidence and Orthogonal Residual Scoring").

The penultimate feature h splits into two orthogonal parts with respect to the classifier
(W, b): its projection onto the span of the rows of W, ``h_∥ = Q Qᵀ h`` (Q an orthonormal
basis of that span), which alone determines the logits (``W h + b = W h_∥ + b``), and the
residual ``h_⊥ = h - h_∥`` that the classifier discards. Each part is scored on its own:

    E(x) = logsumexp_k (W h_∥ + b)_k                 (confidence: the energy score)
    R(x) = cos(h_⊥ - o_⊥, m_ŷ),  ŷ = argmax_k logits   (membership: the class-mean cosine)

with ``m_k = (I - Q Qᵀ)(μ_k - o)`` the residual of the training mean μ_k of class k, and the
two are combined by normalised summation,

    S(x) = (E(x) - a_E) / s_E + (R(x) - a_R) / s_R     (higher = more ID),

a and s the mean and standard deviation of each score over the ID training set (``zscore``),
or their minimum and range (``minmax``). What the sources confirm and what is inferred is
listed in docs/methods.md#core (the authors' OpenOOD code could not be read here).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import InvalidConfiguration, OptInput, OptModel, Reducer
from lightning_ood.detectors.class_stats import ClassMomentsDetector, require_every_class
from lightning_ood.detectors.hparams import HParam, choice
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone
from lightning_ood.models.wrap import linear_classifier

CENTERS = ("none", "mean")
RESIDUAL_CLASSES = ("predicted", "max")
NORMALIZATIONS = ("zscore", "minmax")
#: Norms below this are zero: a cosine with a zero vector is 0, not NaN.
_TINY = 1e-300
#: A spread below this fraction of a score's magnitude is rounding (the standard deviation
#: from Σx² - N·mean² is exact only to ~sqrt(eps) of the mean): the score is constant.
_FLAT = 1e-7


def confidence_basis(weight: Tensor) -> Tensor:
    """An orthonormal basis Q (q, r) of the span of the rows of W (L, q), float64, from the
    SVD ``W = U S Vᵀ``: the right singular vectors of the r singular values above numpy's
    ``matrix_rank`` tolerance ``max(S) · max(L, q) · eps``."""
    w = weight.detach().double()
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    if s.numel() == 0:
        return w.new_zeros(w.shape[1], 0)
    tol = float(s.max()) * max(w.shape) * torch.finfo(torch.float64).eps
    rank = int((s > tol).sum())
    return vh[:rank].T.contiguous()


def orthogonal_residual(h: Tensor, basis: Tensor, origin: Tensor) -> Tensor:
    """``(I - Q Qᵀ)(h - o)``: what the classifier discards of h - o, (B, q) float64."""
    centred = h.double() - origin.double()
    b = basis.double()
    return centred - (centred @ b) @ b.T


def residual_cosine(
    h: Tensor, logits: Tensor, basis: Tensor, origin: Tensor, unit_means: Tensor, which: str
) -> Tensor:
    """R(x): the cosine of the residual of h with the unit residual class mean of the
    predicted class (``which="predicted"``) or the largest over classes (``"max"``), (B,)
    float64; 0 for a zero residual."""
    r = orthogonal_residual(h, basis, origin)
    cos = (r @ unit_means.double().T) / r.norm(dim=1, keepdim=True).clamp_min(_TINY)
    if which == "max":
        return cos.max(dim=1).values
    return cos.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]


@register_detector
class CORE(ClassMomentsDetector):
    """CORE: z-scored energy of the classifier-aligned part plus z-scored cosine of the
    orthogonal residual with its class's mean residual (docs/methods.md#core).

    Two passes over the training outputs, both through the engine (:meth:`next_pass`): the
    first streams float64 per-class feature sums and counts by label
    (:class:`~lightning_ood.detectors.class_stats.ClassMomentsDetector`), all-reduced at its
    end into the class means μ_k (and the training mean, the origin o with
    ``center: mean``); the second, which needs the residual class means, streams the float64
    sum, sum of squares, minimum and maximum of E and R over the training set, the statistics
    of the normalised summation. ``finalize`` reduces them across ranks, so DDP equals one
    process. Scoring buffers: ``basis`` Q (q, r), ``origin`` o (q,), ``unit_means``
    m_k/‖m_k‖ (L, q), ``loc`` (a_E, a_R) and ``scale`` (s_E, s_R).
    """

    kind: ClassVar[str] = "core"
    second_moment: ClassVar[bool] = False  # class means only
    center = HParam(
        "none",
        choice(*CENTERS),
        search=CENTERS,
        doc="none: split h itself (the PR's wording; ViM's origin -W⁺b gives the same "
        "residual); mean: split h minus the training feature mean",
    )
    residual_class = HParam(
        "predicted",
        choice(*RESIDUAL_CLASSES),
        doc="class mean R compares with: predicted (argmax of the logits) or max over classes",
    )
    normalize = HParam(
        "zscore",
        choice(*NORMALIZATIONS),
        search=NORMALIZATIONS,
        stage="finalize",
        doc="statistics of each score over the training set it is normalised by: zscore "
        "(mean, standard deviation) or minmax (minimum, range)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("basis", torch.zeros(0, 0, dtype=f64))  # Q, (q, r)
        self.register_buffer("origin", torch.zeros(0, dtype=f64))  # o, (q,)
        self.register_buffer("unit_means", torch.zeros(0, 0, dtype=f64))  # m_k/‖m_k‖, (L, q)
        self.register_buffer("loc", torch.zeros(2, dtype=f64))  # (a_E, a_R)
        self.register_buffer("scale", torch.ones(2, dtype=f64))  # (s_E, s_R)
        self._pass = 1
        self._means: Tensor | None = None  # μ_k - o after pass 1, (L, q) float64
        self._residual: tuple[Tensor, Tensor] | None = None  # (Q, unit means) for pass 2
        self._stats = self._empty_stats(self.fitted.device)

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._pass, self._means, self._residual = 1, None, None
        self._stats = self._empty_stats(self.fitted.device)

    @staticmethod
    def _empty_stats(device: torch.device) -> dict[str, Tensor]:
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        return {
            "count": torch.zeros((), **kw),
            "sum": torch.zeros(2, **kw),
            "sumsq": torch.zeros(2, **kw),
            "min": torch.full((2,), math.inf, **kw),
            "max": torch.full((2,), -math.inf, **kw),
        }

    def _residual_means(self, model: OODBackbone) -> tuple[Tensor, Tensor]:
        """Q from the head and the unit residual class means m_k/‖m_k‖ (needs pass 1)."""
        assert self._means is not None
        basis = confidence_basis(linear_classifier(model, type(self).__name__).weight)
        basis = basis.to(self._means.device)
        m = self._means - (self._means @ basis) @ basis.T
        return basis, m / m.norm(dim=1, keepdim=True).clamp_min(_TINY)

    def raw_scores(self, out: BackboneOutput) -> Tensor:
        """(E, R) per sample, (B, 2) float64, with the fitted buffers."""
        self.checked_features(out.features, self.unit_means)
        return self._parts(out, self.basis, self.unit_means)

    def _parts(self, out: BackboneOutput, basis: Tensor, unit_means: Tensor) -> Tensor:
        logits = out.logits.detach()
        energy = torch.logsumexp(logits.double(), dim=1)
        cos = residual_cosine(
            out.features.detach(), logits, basis, self.origin, unit_means, self.residual_class
        )
        return torch.stack([energy, cos], dim=1)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Pass 1: per-class feature sums and counts. Pass 2: the sums, sums of squares,
        minima and maxima of E and R (float64)."""
        if self._pass == 1:
            self.add_class_moments(out, target, out.features)
            return
        if model is None:
            raise ValueError(
                f"{self.name}: CORE's second training pass needs `model` (its head W spans "
                "the confidence subspace); fit through lightning_ood.engine.fit_detectors, "
                "which passes it"
            )
        if self._residual is None:
            self._residual = self._residual_means(model)
        parts = self._parts(out, *self._residual)
        st = self._stats
        st["count"] += parts.shape[0]
        st["sum"] += parts.sum(dim=0)
        st["sumsq"] += parts.square().sum(dim=0)
        if parts.shape[0]:
            st["min"] = torch.minimum(st["min"], parts.min(dim=0).values)
            st["max"] = torch.maximum(st["max"], parts.max(dim=0).values)

    def next_pass(self, reducer: Reducer) -> bool:
        """After pass 1: reduce the class sums into μ_k (and o) and ask for pass 2."""
        if self._pass != 1:
            return False
        dev = self.fitted.device
        local = torch.tensor([list(self.class_sum.shape)], dtype=torch.long, device=dev)
        n_classes, q = (int(v) for v in reducer.cat(local).max(dim=0).values)
        if n_classes == 0:
            raise RuntimeError(
                f"{self.name}: no training batch reached update() before the end of the first "
                "pass; fit on the training set"
            )
        if self.class_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            self._allocate(n_classes, q, dev)
        counts = reducer.sum(self.class_count.clone())
        sums = reducer.sum(self.class_sum.clone())
        require_every_class(self.name, counts)
        origin = sums.sum(dim=0) / counts.sum()
        self.origin = origin if self.center == "mean" else torch.zeros_like(origin)
        self._means = sums / counts[:, None] - self.origin
        self._allocate(0, 0, dev)  # the sums are spent
        self._pass, self._residual = 2, None
        self._stats = self._empty_stats(dev)
        return True

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Derive Q and the unit residual means; reduce the score statistics into the
        normalisation's location and scale."""
        reducer = reducer or Reducer()
        if self._pass == 1:
            raise RuntimeError(
                f"{self.name}: CORE needs two passes over the training outputs (the class "
                "means, then the statistics of the two scores); fit through lightning_ood."
                "engine.fit_detectors / fit_from_loader, which run the pass next_pass() asks for"
            )
        if self._means is None:
            raise RuntimeError(
                f"{self.name}: the training statistics were consumed by an earlier finalize(); "
                "call reset() and fit again"
            )
        basis, unit_means = self._residual_means(model)
        q, r = basis.shape
        st = self._stats
        count = reducer.sum(st["count"].clone())
        total, squares = reducer.sum(st["sum"].clone()), reducer.sum(st["sumsq"].clone())
        low = reducer.cat(st["min"][None]).min(dim=0).values
        high = reducer.cat(st["max"][None]).max(dim=0).values
        if r >= q:
            raise InvalidConfiguration(
                f"{self.name}: the {unit_means.shape[0]} classifier rows span all q={q} feature "
                "dimensions, so the orthogonal residual is empty; CORE needs features wider "
                "than the rank of the head W (use another detector for this backbone)"
            )
        if float(count) == 0:
            raise RuntimeError(f"{self.name}: the second pass saw no training sample")
        if self.normalize == "zscore":
            loc = total / count
            scale = (squares / count - loc.square()).clamp_min(0.0).sqrt()
        else:
            loc, scale = low, high - low
        size = torch.maximum(low.abs(), high.abs())
        flat = [
            n
            for n, s, m in zip(("energy", "residual"), scale.tolist(), size.tolist(), strict=True)
            if not math.isfinite(s) or not s > _FLAT * m
        ]
        if flat:
            raise InvalidConfiguration(
                f"{self.name}: the {' and '.join(flat)} score is constant over the training set "
                f"(normalize={self.normalize!r} scale {scale.tolist()}), so it cannot be "
                "normalised; fit on more varied training data"
            )
        self.basis, self.unit_means = basis, unit_means
        self.loc, self.scale = loc, scale
        self._means, self._residual = None, None
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        z = (self.raw_scores(out) - self.loc.double()) / self.scale.double()
        return z.sum(dim=1)


__all__ = [
    "CENTERS",
    "CORE",
    "NORMALIZATIONS",
    "RESIDUAL_CLASSES",
    "confidence_basis",
    "orthogonal_residual",
    "residual_cosine",
]
