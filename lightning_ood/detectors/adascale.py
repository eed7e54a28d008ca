"""AdaSCALE (Regmi, 2025, "AdaSCALE: Adaptive Scaling for OOD Detection", arXiv 2503.08023):
SCALE's activation scaling with a per-sample percentile chosen from how much the sample's
strongest activations move under a small input perturbation.

For a sample x with features h and predicted class ŷ (the authors' OpenOOD code,
``adascale_postprocessor.py`` with ``networks/adascale_net.py``):

1. g = ∇ₓ f_ŷ(x); the fraction ``o`` of input entries with the *smallest* |g| are moved by
   0.5·sign(g), giving x'; h' = h(x') and the shift |h - h'|.
2. Q' = C_o + λ·Q with C_o = Σ_{i ∈ top-k₁(h)} relu(h')_i and Q = Σ_{i ∈ top-k₂(h)} |h - h'|_i
   (top-k by h; k₁, k₂ in percent of the q features).
3. p = p_min + (1 - F(Q'))·(p_max - p_min), F the empirical CDF of Q' over ID fitting samples:
   samples that move more (likely OOD) get a lower percentile, i.e. weaker scaling.
4. r = Σ_i relu(h)_i / Σ_{i ∈ top-k} relu(h)_i with k = q - round(q·p/100) (SCALE's ratio at
   the sample's own percentile); AdaSCALE-A scores energy(W(h·e^r) + b), AdaSCALE-L
   energy((Wh + b)·r²).

Scoring needs the network and the inputs (one forward-backward and one extra forward per
batch); fitting needs the *inputs* of the ID fitting samples too (``fit_needs_inputs``: the
engine's shared training pass hands them to ``update``; cached features cannot fit it). See
docs/methods.md#adascale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors import knn
from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.hparams import HParam, choice, in_range, integer, positive
from lightning_ood.detectors.knn import check_layout, global_positions, seeded_uniform_at
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: OpenOOD's ``adascale_a.yml`` / ``adascale_l.yml`` sweep of (p_min, p_max).
PERCENTILE_PAIRS: tuple[tuple[float, float], ...] = tuple(
    (float(lo), float(hi))
    for lo, his in (
        (60, (65, 70, 75, 80, 85, 90, 95, 99)),
        (65, (70, 75, 80, 85, 90, 95, 99)),
        (70, (75, 80, 85, 90, 95, 99)),
        (75, (80, 85, 90, 95, 99)),
        (80, (85, 90, 95, 99)),
        (85, (90, 95, 99)),
        (90, (95, 99)),
        (95, (99,)),
    )
    for hi in his
)


def percentile_pair(name: str, value: Any, owner: str) -> tuple[float, float]:
    """``(p_min, p_max)`` with 0 < p_min <= p_max < 100."""
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )
    if not ok or not 0.0 < float(value[0]) <= float(value[1]) < 100.0:
        raise ValueError(
            f"{owner}: {name}={value!r} must be a pair [p_min, p_max] with "
            "0 < p_min <= p_max < 100 (percent)"
        )
    return float(value[0]), float(value[1])


def top_indices(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """Indices of the ``k`` largest (smallest) entries per row, ties by position (a stable
    sort, so the choice does not depend on the batch)."""
    return torch.sort(x, dim=1, descending=largest, stable=True).indices[:, :k]


def perturb(x: Tensor, grad: Tensor, fraction: float, step: float = 0.5) -> Tensor:
    """x + step·sign(g) on the ``fraction`` of entries of each sample with the smallest |g|
    (the authors' ``perturb``: ``int(C·H·W·o)`` entries)."""
    flat = grad.flatten(1).abs()
    n = int(flat.shape[1] * fraction)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, top_indices(flat, n, largest=False), 1.0)
    return x + step * grad.sign() * mask.view_as(x)


def shift_statistic(h: Tensor, h_pert: Tensor, k1: int, k2: int, lmbda: float) -> Tensor:
    """Q' = Σ_{top-k₁(h)} relu(h') + λ Σ_{top-k₂(h)} |h - h'|, (B,) float64."""
    c_o = torch.relu(h_pert).gather(1, top_indices(h, k1))
    q = (h - h_pert).abs().gather(1, top_indices(h, k2))
    return c_o.double().sum(dim=1) + lmbda * q.double().sum(dim=1)


def scale_ratio(h: Tensor, percentiles: Tensor) -> Tensor:
    """r = Σ relu(h) / Σ top-k relu(h), k = q - round(q·p/100) per sample but at least 1,
    (B, 1); a row of zeros gives r = 0. (The reference divides by an empty top-k, r = inf,
    where q·p/100 rounds to q, and 0 by 0 on a zero row.)"""
    a = torch.relu(h)
    q = a.shape[1]
    ks = (q - torch.round(q * percentiles.double() / 100.0).long()).clamp_min(1)  # float64
    vals = torch.sort(a, dim=1, descending=True).values
    keep = torch.arange(q, device=a.device)[None, :] < ks[:, None]
    top = (vals * keep).sum(dim=1, keepdim=True)
    total = a.sum(dim=1, keepdim=True)
    return torch.where(top > 0, total / top.clamp_min(torch.finfo(a.dtype).tiny), 0.0 * total)


@register_detector
class AdaScale(LinearHeadDetector):
    """AdaSCALE-A / -L (docs/methods.md#adascale): energy of SCALE-rescaled features (or
    logits) at a per-sample percentile set by the empirical CDF of the perturbation statistic
    Q' over ID fitting samples."""

    kind: ClassVar[str] = "adascale"
    needs_input_grad: ClassVar[bool] = True
    #: ``update`` needs the fitting batch's inputs (``inputs=``) as well as its outputs.
    fit_needs_inputs: ClassVar[bool] = True

    variant = HParam(
        "a", choice("a", "l"), stage="score",
        doc='"a": scale the activations by e^r (AdaSCALE-A); "l": the logits by r² (-L)',
    )  # fmt: skip
    percentiles = HParam(
        (75.0, 85.0), percentile_pair, search=PERCENTILE_PAIRS, stage="score",
        doc="[p_min, p_max] (percent) the adaptive percentile moves between",
    )  # fmt: skip
    k1 = HParam(
        5.0,
        in_range(0.0, 100.0, low_open=True, high_open=False),
        doc="k₁: top activations (percent of q) whose perturbed values form C_o",
    )
    k2 = HParam(
        1.0,
        in_range(0.0, 100.0, low_open=True, high_open=False),
        doc="k₂: top activations (percent of q) whose shifts form Q",
    )
    lmbda = HParam(10.0, in_range(0.0), doc="λ: weight of Q in Q' = C_o + λQ")
    o = HParam(
        0.05,
        in_range(0.0, 1.0, low_open=True, high_open=False),
        doc="fraction of input entries (smallest |∇|) perturbed",
    )
    num_samples = HParam(5000, integer(1), doc="ID fitting samples in the empirical CDF")
    seed = HParam(0, integer(0), doc="seed of the fitting-sample draw")
    step = HParam(0.5, positive(), doc="perturbation step on the (normalised) inputs")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("reference", torch.zeros(0, dtype=torch.float64))  # sorted Q'
        self._reset_sample()

    # -- the statistic ------------------------------------------------------------------------
    def _ks(self, q: int) -> tuple[int, int]:
        k1, k2 = int(q * self.k1 / 100), int(q * self.k2 / 100)
        if k1 < 1 or k2 < 1:
            raise ValueError(
                f"{self.name}: k1={self.k1}% / k2={self.k2}% of {q} features select no "
                "activation; raise them"
            )
        return k1, k2

    def statistic(self, model: OODBackbone, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(Q' (B,) float64, the clean features h (B, q)) of ``inputs``: one forward-backward
        for ∇ₓ f_ŷ and one forward of the perturbed inputs."""
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)
            out = model.extract(x)
            top = out.logits.gather(1, out.logits.detach().argmax(dim=1, keepdim=True))
            (grad,) = torch.autograd.grad(top.sum(), x)
        h = out.features.detach()
        with torch.no_grad():
            h_pert = model.extract(perturb(x.detach(), grad, self.o, self.step)).features
        k1, k2 = self._ks(h.shape[1])
        return shift_statistic(h, h_pert, k1, k2, self.lmbda), h

    # -- fitting ---------------------------------------------------------------------------
    def _reset_sample(self) -> None:
        self._draws: Tensor | None = None  # (m,) float64 seeded draws of the kept samples
        self._stats: Tensor | None = None  # (m,) their Q'
        self._seen = 0
        self._layout = knn.stream_layout()  # read through the module: tests patch it

    def reset(self) -> None:
        self._reset_sample()
        self.fitted.fill_(False)

    def update(
        self,
        out: BackboneOutput,
        target: Tensor,
        model: OODBackbone | None = None,
        inputs: Tensor | None = None,
    ) -> None:
        """Keep the ``num_samples`` fitting samples of smallest seeded draw (by training-set
        position, so the same on any world size), computing Q' only for those that can still
        be among them."""
        if model is None or inputs is None:
            raise ValueError(
                f"{self.name}: AdaSCALE's fitting statistic perturbs the fitting inputs; "
                "update() needs model= and inputs= (an engine pass that hands the inputs to "
                "detectors with fit_needs_inputs)"
            )
        n = inputs.shape[0]
        pos = global_positions(self._seen, n, self._layout, inputs.device)
        self._seen += n
        u = seeded_uniform_at(pos, self.seed)
        if self._draws is not None and self._draws.numel() >= self.num_samples:
            cut = self._draws.max()
            cand = u < cut
            if not bool(cand.any()):
                return
            inputs, u = inputs[cand], u[cand]
        stats, _ = self.statistic(model, inputs)
        draws = u if self._draws is None else torch.cat([self._draws, u])
        stats = stats if self._stats is None else torch.cat([self._stats, stats])
        keep = torch.sort(draws, stable=True).indices[: self.num_samples]
        self._draws, self._stats = draws[keep], stats[keep]

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        self._copy_head(model)
        dev = self.weight.device
        draws = self._draws if self._draws is not None else torch.zeros(0, dtype=torch.float64)
        stats = self._stats if self._stats is not None else torch.zeros(0, dtype=torch.float64)
        check_layout(reducer, self._layout[1], self.name, dev)
        draws, stats = reducer.cat(draws.to(dev)), reducer.cat(stats.to(dev))
        if stats.numel() == 0:
            raise RuntimeError(f"{self.name}: no fitting sample was seen")
        keep = torch.sort(draws, stable=True).indices[: self.num_samples]
        self.reference = torch.sort(stats[keep]).values
        self.fitted.fill_(True)

    # -- scoring ---------------------------------------------------------------------------
    def adaptive_percentiles(self, stat: Tensor) -> Tensor:
        """p = p_min + (1 - F(Q'))·(p_max - p_min), F the right-continuous empirical CDF of
        the fitted Q' (statsmodels' ``ECDF``), (B,) float64."""
        ref = self.reference.double()
        cdf = torch.searchsorted(ref, stat.double().contiguous(), right=True) / ref.numel()
        lo, hi = self.percentiles
        return lo + (1.0 - cdf) * (hi - lo)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        self.check_fitted()
        if model is None or inputs is None:
            raise ValueError(f"{self.name}: AdaSCALE scores from the inputs; pass model and inputs")
        stat, _ = self.statistic(model, inputs)
        h = self._check_features(out.features)
        r = scale_ratio(h, self.adaptive_percentiles(stat))
        if self.variant == "a":
            logits = (h * torch.exp(r)) @ self.weight.T + self.bias
        else:
            logits = (h @ self.weight.T + self.bias) * r.square()
        return energy_score(logits)


__all__ = ["PERCENTILE_PAIRS", "AdaScale", "perturb", "scale_ratio", "shift_statistic"]
