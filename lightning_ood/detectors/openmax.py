"""OpenMax (Bendale & Boult, CVPR 2016, "Towards Open Set Deep Networks").

The activation vector (AV) is the logit vector f(x). Per class k: the mean activation vector
μ_k (MAV) of the correctly classified training samples of k, and a Weibull distribution fitted
to the largest ``tailsize`` distances of those samples to μ_k (extreme value theory, the
paper's Alg. 1, libMR's ``FitHigh``). At test time the top ``alpha`` classes of f(x) are
revised (Alg. 2): with ranks r = 1..α, ω_k = 1 - (α - r + 1)/α · w_k(x), w_k the Weibull CDF
of x's distance to μ_k,

    f̂_k = f_k ω_k,    f̂_0 = Σ_k f_k (1 - ω_k)   (the "unknown" activation),

and the OpenMax probabilities are softmax(f̂_0, f̂_1, ..., f̂_L). The score is minus the
unknown probability (OpenOOD v1.5, pytorch-ood) or, with ``score: max_known``, the largest
known-class probability (the quantity the paper's rejection rule thresholds);
docs/methods.md#openmax.

The Weibull fit is the maximum-likelihood fit of libMR (no libMR here): the tail t_1..t_n is
translated to ``t_i + 10000 - min_j t_j`` (libMR's translate amount) and the two-parameter
Weibull (location 0) fitted by MLE; its shape solves
``Σ x^k ln x / Σ x^k - 1/k = mean(ln x)`` (monotone in k, solved by bisection in float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer
from lightning_ood.detectors.class_stats import check_labelled, require_every_class
from lightning_ood.detectors.hparams import HParam, boolean, choice, in_range, integer
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

DISTANCES = ("euclidean", "cosine", "eucos")
SCORES = ("unknown", "max_known")
#: libMR's ``translate_amount``: the tail is shifted to start at this value before the fit.
TRANSLATE = 10000.0


def av_distances(av: Tensor, mavs: Tensor, distance: str, eu_weight: float) -> Tensor:
    """Distances (B, K) of activation vectors ``av`` (B, L) to ``mavs`` (K, L), float64:
    Euclidean, cosine (1 - cos, scipy's ``cosine``) or ``eu_weight`` x Euclidean + cosine
    (the paper's "eucos")."""
    a, m = av.double(), mavs.double()
    out = a.new_zeros(a.shape[0], m.shape[0])
    if distance in ("euclidean", "eucos"):
        sq = (a.square().sum(1, keepdim=True) - 2.0 * a @ m.T + m.square().sum(1)).clamp_min(0)
        out = out + (eu_weight if distance == "eucos" else 1.0) * sq.sqrt()
    if distance in ("cosine", "eucos"):
        norms = a.norm(dim=1, keepdim=True).clamp_min(1e-300) * m.norm(dim=1).clamp_min(1e-300)
        out = out + 1.0 - (a @ m.T) / norms
    return out


def weibull_mle(tails: Tensor, valid: Tensor, iters: int = 200) -> tuple[Tensor, Tensor]:
    """Two-parameter Weibull MLE (location 0) of each row of ``tails`` (K, n) over its
    ``valid`` entries (at least two distinct values per row): ``(shape, scale)``, (K,) float64.

    The shape k solves ``E_w[ln x] - 1/k - mean(ln x) = 0`` with w ∝ x^k (increasing in k);
    bisection of log k over [1e-6, 1e15] to float64 resolution, vectorised over the rows.
    The scale is ``(mean x^k)^(1/k)``."""
    x = tails.double()
    logx = torch.where(valid, x.clamp_min(1e-300).log(), torch.zeros_like(x))
    n = valid.sum(dim=1).double()
    mean_log = logx.sum(dim=1) / n
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64, device=x.device)

    top = torch.where(valid, logx, neg_inf).max(dim=1, keepdim=True).values
    rel = torch.where(valid, logx - top, torch.zeros_like(x))  # ln x - max ln x <= 0

    def g(k: Tensor) -> Tensor:
        w = torch.where(valid, torch.exp(k[:, None] * rel), torch.zeros_like(x))
        return (w * rel).sum(dim=1) / w.sum(dim=1) + top[:, 0] - 1.0 / k - mean_log

    lo = torch.full_like(n, math.log(1e-6))
    hi = torch.full_like(n, math.log(1e15))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        up = g(mid.exp()) < 0  # root above mid
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    k = (0.5 * (lo + hi)).exp()
    lse = torch.logsumexp(torch.where(valid, k[:, None] * logx, neg_inf), dim=1)
    scale = ((lse - n.log()) / k).exp()
    return k, scale


def weibull_cdf(x: Tensor, shape: Tensor, scale: Tensor) -> Tensor:
    """``1 - exp(-(x/λ)^k)`` for x > 0, 0 below (float64; broadcasts)."""
    z = (x.double() / scale).clamp_min(0.0)
    return -torch.expm1(-torch.exp(shape * torch.log(z)))


@register_detector
class OpenMax(Detector):
    """OpenMax: the EVT-recalibrated softmax over the L classes and an "unknown" class.

    Two passes over the training outputs, both through the engine's shared passes
    (:meth:`next_pass`): the first accumulates per-class float64 sums of the correctly
    classified AVs (reduced across ranks at its end: the MAVs); the second, which needs the
    MAVs, keeps for each class only the ``tailsize`` largest distances to its MAV (O(L x
    tailsize) memory, however large the training set). ``finalize`` gathers the ranks' tails
    (``Reducer.cat``), keeps each class's ``tailsize`` largest and fits the Weibulls. Buffers:
    ``mavs`` (L, L), ``weibull_shape``, ``weibull_scale``, ``tail_min`` (L,).
    """

    kind = "openmax"
    requires_fit = True
    tailsize = HParam(
        20,
        integer(2),
        search=(10, 20, 50),
        doc="largest training distances per class the Weibull is fitted to (paper, OpenOOD: 20)",
    )
    alpha = HParam(
        10,
        integer(1),
        search=(1, 3, 5, 10),
        stage="score",
        doc="top classes revised (paper: 10; OpenOOD v1.5: 3); min(alpha, L) is used",
    )
    distance = HParam(
        "euclidean",
        choice(*DISTANCES),
        doc="AV distance to the MAV: euclidean (OpenOOD), cosine, or eucos (paper)",
    )
    eu_weight = HParam(
        0.005,
        in_range(0.0),
        doc="weight of the Euclidean term of eucos (paper code: 1/200; OpenOOD: 0.5)",
    )
    score_type = HParam(
        "unknown",
        choice(*SCORES),
        stage="score",
        doc="unknown: minus the unknown-class probability (OpenOOD, pytorch-ood); max_known: "
        "the largest known-class probability (the paper's rejection rule)",
    )
    correct_only = HParam(
        True,
        boolean(),
        doc="MAVs and tails from the correctly classified training samples (paper, OpenOOD); "
        "false: every sample of its label (pytorch-ood)",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("mavs", torch.zeros(0, 0, dtype=f64))  # μ_k, (L, L)
        self.register_buffer("weibull_shape", torch.zeros(0, dtype=f64))  # k, (L,)
        self.register_buffer("weibull_scale", torch.zeros(0, dtype=f64))  # λ, (L,)
        self.register_buffer("tail_min", torch.zeros(0, dtype=f64))  # min of each tail, (L,)
        self._pass = 1
        self._sums: Tensor | None = None  # pass 1: (L, L) float64 sums of correct AVs
        self._counts: Tensor | None = None  # pass 1: (L,)
        self._tails: Tensor | None = None  # pass 2: (L, tailsize) largest distances, -inf pad

    # -- fitting --------------------------------------------------------------------------
    def reset(self) -> None:
        self._pass, self._sums, self._counts, self._tails = 1, None, None, None
        self.fitted.fill_(False)

    def _kept(self, out: BackboneOutput, target: Tensor) -> tuple[Tensor, Tensor]:
        """The AVs and labels of the samples that enter the fit (correct ones by default)."""
        f = out.logits.detach()
        y = target.reshape(-1).long().to(f.device)
        check_labelled(self.name, f, y, f.shape[-1], what="logits", shape="(B, L)")
        if self.correct_only:
            keep = f.argmax(dim=1) == y
            f, y = f[keep], y[keep]
        return f, y

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Pass 1: per-class sums of the AVs. Pass 2: each class's largest distances."""
        f, y = self._kept(out, target)
        n_classes = out.logits.shape[1]
        if self._pass == 1:
            if self._sums is None:
                self._sums = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=f.device)
                self._counts = torch.zeros(n_classes, dtype=torch.float64, device=f.device)
            elif self._sums.shape[0] != n_classes:
                raise ValueError(
                    f"{self.name}: the number of classes changed from {self._sums.shape[0]} to "
                    f"{n_classes} during fitting"
                )
            assert self._counts is not None
            self._sums.index_add_(0, y, f.double())
            self._counts += torch.bincount(y, minlength=n_classes).double()
            return
        mavs = self.mavs
        if n_classes != mavs.shape[0]:
            raise ValueError(
                f"{self.name}: the second pass has {n_classes} classes, the first had "
                f"{mavs.shape[0]}"
            )
        d = av_distances(f, mavs, self.distance, self.eu_weight).gather(1, y[:, None])[:, 0]
        by_class = torch.full((n_classes, d.shape[0]), -math.inf, dtype=torch.float64,
                              device=d.device)  # fmt: skip
        by_class[y, torch.arange(d.shape[0], device=d.device)] = d
        if self._tails is None:
            self._tails = by_class.new_full((n_classes, 0), -math.inf)
        cand = torch.cat([self._tails, by_class], dim=1)
        self._tails = cand.topk(min(self.tailsize, cand.shape[1]), dim=1).values

    def next_pass(self, reducer: Reducer) -> bool:
        """After pass 1: reduce the sums into the MAVs and ask for pass 2; after it: done."""
        if self._pass != 1:
            return False
        # a rank that saw no batch still joins the sums, sized by the others' class count
        dev = self.mavs.device
        local = 0 if self._sums is None else self._sums.shape[0]
        n_classes = int(reducer.cat(torch.tensor([local], device=dev)).max())
        if n_classes == 0:
            raise RuntimeError(
                f"{self.name}: no training batch reached update() before the end of the first "
                "pass; fit on the training set"
            )
        if self._sums is None or self._counts is None:
            self._sums = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=dev)
            self._counts = torch.zeros(n_classes, dtype=torch.float64, device=dev)
        sums, counts = reducer.sum(self._sums.clone()), reducer.sum(self._counts.clone())
        require_every_class(
            self.name, counts, what="mean activation vectors", correct_only=bool(self.correct_only)
        )
        self.mavs = sums / counts[:, None]
        self._pass, self._sums, self._counts = 2, None, None
        return True

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Gather every rank's tails, keep each class's ``tailsize`` largest, fit the
        Weibulls."""
        reducer = reducer or Reducer()
        if self._pass == 1:
            raise RuntimeError(
                f"{self.name}: OpenMax needs two passes over the training outputs (the class "
                "means, then the distances to them); fit through lightning_ood.engine."
                "fit_detectors / fit_from_loader, which run the pass next_pass() asks for"
            )
        n_classes = self.mavs.shape[0]
        tails = self._tails
        if tails is None:  # a rank that saw no batch in the second pass
            tails = self.mavs.new_full((n_classes, 0), -math.inf)
        width = self.tailsize  # pad so every rank contributes (L, tailsize)
        if tails.shape[1] < width:
            pad = tails.new_full((n_classes, width - tails.shape[1]), -math.inf)
            tails = torch.cat([tails, pad], dim=1)
        gathered = reducer.cat(tails)  # (w L, tailsize) in rank order
        world = gathered.shape[0] // n_classes
        every = gathered.reshape(world, n_classes, width).permute(1, 0, 2).reshape(n_classes, -1)
        tails = every.topk(width, dim=1).values
        valid = torch.isfinite(tails)
        low = torch.where(valid, tails, torch.full_like(tails, math.inf)).min(dim=1).values
        spread = torch.where(valid, tails, torch.full_like(tails, -math.inf)).max(dim=1).values
        flat = torch.nonzero(~(spread > low)).flatten().tolist()
        if flat:
            raise ValueError(
                f"{self.name}: classes {flat} have fewer than two distinct training distances "
                "to their mean activation vector, so no Weibull can be fitted to their tail; "
                "fit on more training samples or set correct_only: false"
            )
        shape, scale = weibull_mle(tails - low[:, None] + TRANSLATE, valid)
        self.weibull_shape, self.weibull_scale, self.tail_min = shape, scale, low
        self.fitted.fill_(True)

    # -- scoring --------------------------------------------------------------------------
    def probabilities(self, logits: Tensor) -> Tensor:
        """OpenMax probabilities (B, L + 1), the unknown class first, float64."""
        self.check_fitted()
        n_classes = self.mavs.shape[0]
        if logits.dim() != 2 or logits.shape[1] != n_classes:
            raise ValueError(
                f"{self.name}: logits must have shape (B, {n_classes}), got "
                f"{tuple(logits.shape)}; was the detector fitted on another backbone?"
            )
        f = logits.double()
        d = av_distances(f, self.mavs, self.distance, self.eu_weight)
        shifted = d - self.tail_min.double() + TRANSLATE
        w = weibull_cdf(shifted, self.weibull_shape.double(), self.weibull_scale.double())
        a = min(self.alpha, n_classes)
        top = f.topk(a, dim=1).indices  # ranks 1..α
        rank_weight = torch.arange(a, 0, -1, dtype=torch.float64, device=f.device) / a
        omega = torch.zeros_like(f).scatter(1, top, rank_weight.expand(f.shape[0], a))
        revised = f * (1.0 - w * omega)
        unknown = (f - revised).sum(dim=1, keepdim=True)
        return torch.softmax(torch.cat([unknown, revised], dim=1), dim=1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        p = self.probabilities(out.logits)
        if self.score_type == "unknown":
            return -p[:, 0]
        return p[:, 1:].max(dim=1).values


__all__ = ["DISTANCES", "SCORES", "TRANSLATE", "OpenMax", "av_distances", "weibull_mle"]
