"""WeiPer (Granz, Heurich & Landgraf, NeurIPS 2024, "WeiPer: OOD Detection using Weight
Perturbations of Class Projections"): the WeiPer+KLD score.

The head's class directions w_c are perturbed ``r`` times, ``w̃_c = w_c + δ‖w_c‖ η/‖η‖`` with
η ~ N(0, I) (eq. (1)†), giving ``r·C`` perturbed logits ``W̃h + b``. Each sample is
summarised by two histograms over fixed bins spanning the training range: of its own
penultimate activations (the ``q`` values of h) and of its perturbed logits; the score compares
them with the training mean histograms by a symmetric KL divergence, and adds the mean
maximum softmax over the ``r`` perturbed heads (MSP_W, eq. (2)†):

    WeiPer+KLD(x) = -(KL_s(p̄, q_{s1}(h)) + λ₁ KL_s(p̄_W, q_{s2}(W̃h + b)) - λ₂ MSP_W(x))

(eqs. (5)-(6)†; † numbers unchecked; KL_s(p, q) = KL(p‖q) + KL(q‖p); ``q_s`` the sample's
histogram smoothed by a uniform kernel of ``s`` bins; higher = more ID). See
docs/methods.md#weiper for the choices made where the authors' code differs from the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, in_range, integer, positive
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: The reference's histogram range is ``[min, max + 1e-8)``, so the training maximum is binned.
EDGE_EPS = 1e-8


def perturbed_head(weight: Tensor, bias: Tensor, repeats: int, delta: float, seed: int) -> tuple[
    Tensor, Tensor
]:  # fmt: skip
    """W̃ (r·C, q) and b̃ (r·C,): ``r`` copies of the head whose rows are moved by
    ``δ‖w_c‖ η/‖η‖`` (eq. (1)†), η drawn in float64 on the CPU from ``seed`` alone, so the
    perturbation is the same on every rank, device and run. Row ``j·C + c`` is copy ``j`` of
    class ``c`` (the reference's order)."""
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().double().cpu()
    eta = torch.randn((repeats, *w.shape), generator=gen, dtype=torch.float64)
    eta = eta / eta.norm(dim=2, keepdim=True).clamp_min(1e-300)
    pert = w[None] + delta * w.norm(dim=1)[None, :, None] * eta
    w_t = pert.reshape(-1, w.shape[1]).to(device=weight.device, dtype=weight.dtype)
    return w_t, bias.detach().repeat(repeats)


def bin_edges(lo: Tensor, hi: Tensor, n_bins: int) -> Tensor:
    """``n_bins + 1`` equally spaced float64 edges from ``lo`` to ``hi + 1e-8``."""
    steps = torch.arange(n_bins + 1, dtype=torch.float64, device=lo.device) / n_bins
    lo, hi = lo.double(), hi.double() + EDGE_EPS
    return lo + steps * (hi - lo)


def bin_counts(values: Tensor, edges: Tensor) -> Tensor:
    """Per row of ``values`` (B, D): how many of its D values fall in each bin
    ``[e_i, e_{i+1})`` of ``edges``, (B, n_bins) float64; values outside are not counted."""
    n_bins = edges.numel() - 1
    # bucketize(right=True) gives i with e_{i-1} <= v < e_i: bin i - 1, 0 below, n_bins+1 above
    idx = torch.bucketize(values.double().contiguous(), edges, right=True)
    counts = values.new_zeros(values.shape[0], n_bins + 2, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts[:, 1 : n_bins + 1]


def smooth(density: Tensor, size: int) -> Tensor:
    """Moving average of ``size`` bins along dim 1 of (B, n_bins), edges replicated; the
    window of bin i spans ``i - (size-1)//2 .. i + size//2`` (the reference's
    ``Conv1d(padding="same", padding_mode="replicate")``)."""
    if size == 1:
        return density
    left = (size - 1) // 2
    right = size - 1 - left
    # edges replicated by concatenation and window sums by differences of a cumulative sum:
    # both export to ONNX in float64 (onnxruntime has no float64 AveragePool)
    x = torch.cat(
        [density[:, :1].expand(-1, left), density, density[:, -1:].expand(-1, right)], dim=1
    )
    c = torch.cat([x.new_zeros(x.shape[0], 1), x.cumsum(dim=1)], dim=1)
    return (c[:, size:] - c[:, :-size]) / size


def symmetric_kl(p: Tensor, q: Tensor, eps: float) -> Tensor:
    """KL(p‖q) + KL(q‖p) = Σ (p - q)(log p - log q) of ``p + eps`` and ``q + eps``, each
    renormalised to sum 1; ``p`` (n_bins,) against every row of ``q`` (B, n_bins)."""
    p = p + eps
    q = q + eps
    p = p / p.sum()
    q = q / q.sum(dim=1, keepdim=True)
    return ((p - q) * (p.log() - q.log())).sum(dim=1)


@register_detector
class WeiPer(LinearHeadDetector):
    """WeiPer+KLD (docs/methods.md#weiper): symmetric KL divergences of the sample's
    activation and perturbed-logit histograms from the training means, plus λ₂·MSP_W.

    Fitting takes two passes over the training outputs: the first finds the exact training
    ranges (min, max) of the activations and of the perturbed logits, which fix the bins; the
    second sums the per-sample histograms in float64 (reduced across DDP ranks). The
    perturbation is drawn from ``seed`` alone (:func:`perturbed_head`), so it does not depend
    on the world size.
    """

    kind = "weiper"
    #: OpenOOD's WeiPer ``weiper_kldiv.yml`` (the authors' integration) sweeps the six below.
    n_repeats = HParam(100, integer(1), doc="r: perturbed copies of the head (paper: 100)")
    perturbation_distance = HParam(
        1.8, positive(), search=(1.8, 2.0, 2.2, 2.4), doc="δ: relative perturbation length"
    )
    n_bins = HParam(100, integer(2), search=(60, 80, 100), doc="histogram bins")
    smoothing = HParam(
        4, integer(1), search=(4, 8, 12, 20, 40), stage="score",
        doc="s₁: uniform smoothing window (bins) of the activation histogram",
    )  # fmt: skip
    smoothing_perturbed = HParam(
        15, integer(1), search=(15, 25, 40), stage="score",
        doc="s₂: uniform smoothing window (bins) of the perturbed-logit histogram",
    )  # fmt: skip
    lambda_1 = HParam(
        2.5, in_range(0.0), search=(0.1, 1.0, 2.5, 4.0), stage="score",
        doc="λ₁: weight of the perturbed-logit KL divergence",
    )  # fmt: skip
    lambda_2 = HParam(
        0.1, in_range(0.0), search=(0.1, 0.25, 1.0, 2.5, 5.0), stage="score",
        doc="λ₂: weight of MSP_W",
    )  # fmt: skip
    epsilon = HParam(0.01, positive(), stage="score", doc="ε added to the activation densities")
    epsilon_perturbed = HParam(
        0.025, positive(), stage="score", doc="ε added to the perturbed-logit densities"
    )
    seed = HParam(0, integer(0), doc="seed of the perturbation η")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.register_buffer("weight_perturbed", torch.zeros(0))  # W̃, (r·C, q)
        self.register_buffer("bias_perturbed", torch.zeros(0))  # b̃, (r·C,)
        self.register_buffer("edges", torch.zeros(0, dtype=f64))  # activation bins (n+1,)
        self.register_buffer("edges_perturbed", torch.zeros(0, dtype=f64))  # (n+1,)
        self.register_buffer("density", torch.zeros(0, dtype=f64))  # p̄, (n,)
        self.register_buffer("density_perturbed", torch.zeros(0, dtype=f64))  # p̄_W, (n,)
        self._reset_accumulators()

    # -- fitting ----------------------------------------------------------------------------
    def _reset_accumulators(self) -> None:
        self._pass = 0
        inf = math.inf
        self._range = [inf, -inf, inf, -inf]  # min h, max h, min W̃h+b, max W̃h+b
        self._hist: list[Tensor | None] = [None, None]
        self._count = 0

    def reset(self) -> None:
        self._reset_accumulators()
        self.weight_perturbed = self.weight_perturbed.new_zeros(0)  # redrawn from the head
        self.fitted.fill_(False)

    def _perturbed_logits(self, h: Tensor) -> Tensor:
        return h.to(self.weight_perturbed.dtype) @ self.weight_perturbed.T + self.bias_perturbed

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        h = out.features.detach()
        if self.weight_perturbed.numel() == 0:
            if model is None:
                raise ValueError(
                    f"{self.name}: WeiPer perturbs the head while fitting; pass the backbone "
                    "to update() (engine.fit_detectors does)"
                )
            self._copy_head(model)
            self.weight_perturbed, self.bias_perturbed = perturbed_head(
                self.weight, self.bias, self.n_repeats, self.perturbation_distance, self.seed
            )
        if h.shape[0] == 0:
            return
        z = self._perturbed_logits(h)
        if self._pass == 0:  # exact training ranges (the reference's exact_minmax)
            r = self._range
            r[0], r[1] = min(r[0], float(h.min())), max(r[1], float(h.max()))
            r[2], r[3] = min(r[2], float(z.min())), max(r[3], float(z.max()))
            return
        for i, (v, e) in enumerate(((h, self.edges), (z, self.edges_perturbed))):
            s = bin_counts(v, e).sum(dim=0)
            self._hist[i] = s if self._hist[i] is None else self._hist[i] + s
        self._count += h.shape[0]

    def next_pass(self, reducer: Reducer) -> bool:
        """After the first pass: the all-rank ranges fix the bins, and one more pass sums the
        histograms."""
        if self._pass > 0:
            return False
        dev = self.fitted.device  # the detector's device, also on a rank that saw no batch
        local = torch.tensor([self._range], dtype=torch.float64, device=dev)
        ranges = reducer.cat(local)
        lo, hi = ranges.min(dim=0).values, ranges.max(dim=0).values
        if not (math.isfinite(float(lo[0])) and math.isfinite(float(hi[1]))):
            raise RuntimeError(
                f"{self.name}: no training sample was seen (or the features are not finite); "
                "WeiPer's bins span the training range, so fit it on the training set"
            )
        self.edges = bin_edges(lo[0], hi[1], self.n_bins)
        self.edges_perturbed = bin_edges(lo[2], hi[3], self.n_bins)
        self._pass = 1
        return True

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        reducer = reducer or Reducer()
        if self._pass == 0:
            raise RuntimeError(
                f"{self.name}: WeiPer needs two passes over the training outputs (the ranges "
                "that fix the bins, then the histograms); fit it through "
                "lightning_ood.engine.fit_detectors, which runs the pass next_pass() asks for"
            )
        if self.weight_perturbed.numel() == 0:  # a rank that saw no batch
            self._copy_head(model)
            self.weight_perturbed, self.bias_perturbed = perturbed_head(
                self.weight, self.bias, self.n_repeats, self.perturbation_distance, self.seed
            )
        dev = self.edges.device
        hist = [
            reducer.sum(h if h is not None else torch.zeros(self.n_bins, dtype=torch.float64,
                                                             device=dev))
            for h in self._hist
        ]  # fmt: skip
        count = float(reducer.sum(torch.tensor(float(self._count), dtype=torch.float64,
                                                device=dev)))  # fmt: skip
        if count == 0:
            raise RuntimeError(f"{self.name}: no training sample was seen in the second pass")
        # mean over training samples of the per-sample densities (counts / values per sample)
        self.density = hist[0] / (count * self.weight.shape[1])
        self.density_perturbed = hist[1] / (count * self.weight_perturbed.shape[0])
        self.fitted.fill_(True)

    # -- scoring ----------------------------------------------------------------------------
    def components(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(KL_s of the activations, KL_s of the perturbed logits, MSP_W), each (B,) float64."""
        h = self._check_features(features)
        z = self._perturbed_logits(h)
        dens = bin_counts(h, self.edges) / h.shape[1]
        dens_w = bin_counts(z, self.edges_perturbed) / z.shape[1]
        kl = symmetric_kl(self.density, smooth(dens, self.smoothing), self.epsilon)
        kl_w = symmetric_kl(
            self.density_perturbed,
            smooth(dens_w, self.smoothing_perturbed),
            self.epsilon_perturbed,
        )
        c = self.weight.shape[0]
        zr = z.reshape(z.shape[0], self.weight_perturbed.shape[0] // c, c)
        msp = zr.softmax(dim=2).amax(dim=2).double().mean(dim=1)
        return kl, kl_w, msp

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        kl, kl_w, msp = self.components(out.features)
        return self.lambda_2 * msp - kl - self.lambda_1 * kl_w


__all__ = ["WeiPer", "bin_counts", "bin_edges", "perturbed_head", "smooth", "symmetric_kl"]
