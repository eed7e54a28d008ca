"""GradNorm (Huang, Geng & Li, NeurIPS 2021, "On the Importance of Gradients for Detecting
Distributional Shifts in the Wild"): the L1 norm of the gradient, w.r.t. the last layer's
weight, of the KL divergence from the uniform distribution to the softmax output; computed in
closed form from the penultimate feature, batched, without autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.ash import HeadOnlyDetector
from lightning_ood.detectors.base import OptInput, OptModel
from lightning_ood.detectors.hparams import HParam, positive
from lightning_ood.detectors.nci import check_flag
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


def gradnorm_score(
    features: Tensor, logits: Tensor, temperature: float = 1.0, include_bias: bool = False
) -> Tensor:
    """``||∂KL(u || softmax(f/T)) / ∂W||_1`` per sample for a linear head, shape (B,).

    ``= ||softmax(f/T) − u||_1 · ||h||_1 / T`` (see :class:`GradNorm` for the derivation);
    with ``include_bias`` the bias gradient's ``||softmax(f/T) − u||_1 / T`` is added.
    """
    num_classes = logits.shape[1]
    v = (torch.softmax(logits / temperature, dim=1) - 1.0 / num_classes).abs().sum(dim=1)
    u = features.abs().sum(dim=1)
    if include_bias:
        u = u + 1.0
    return v * u / temperature


@register_detector
class GradNorm(HeadOnlyDetector):
    """GradNorm: ``S(x) = ||∂D_KL(u || softmax(f(x)/T)) / ∂W||_1``; higher = more ID.

    The paper scores the L1 norm of the gradient of ``D_KL(u || softmax(f/T))`` (``u`` the
    uniform distribution over the L classes) w.r.t. the weight W of the last layer, one
    backward pass per image. For a linear head ``f = W h + b`` it has a closed form:

    * ``D_KL(u || p) = Σ_c (1/L) log((1/L) / p_c) = −log L − (1/L) Σ_c log p_c`` with
      ``p = softmax(z)``, ``z = f / T``;
    * ``∂(−log p_c)/∂z_j = p_j − δ_cj``, so ``∂D_KL/∂z_j = (1/L) Σ_c (p_j − δ_cj) = p_j − 1/L``;
    * ``∂z_j/∂W_jk = h_k / T`` (and 0 for other rows), so ``∂D_KL/∂W = (p − u) hᵀ / T``, a
      rank-one (L, q) matrix;
    * the entrywise L1 norm of an outer product factorises,
      ``Σ_jk |a_j b_k| = ||a||_1 ||b||_1``, hence
      ``S(x) = ||p − u||_1 · ||h||_1 / T``

    — the product of a feature-space factor U = ||h||_1 and an output-space factor
    V = ||p − u||_1 that the paper's analysis of GradNorm works with. Here it costs one
    softmax per batch: no autograd, no per-sample backward.

    Bias: the paper and the authors' code (``test_ood.py``: ``model.head.conv.weight.grad``,
    the BiT head, no bias gradient) use the weight only, and so does the default. With
    ``include_bias`` the bias gradient ``∂D_KL/∂b = (p − u)/T`` is added to the norm,
    ``S = ||p − u||_1 (||h||_1 + 1) / T``, as pytorch-ood's GradNorm computes when its
    ``param_filter`` selects every parameter of the head.

    Convention differences (same ranking): the authors' code sums ``−log p_c`` over the classes
    instead of averaging (their loss is L·(D_KL + log L)), so its scores are L times these;
    OpenOOD v1.5 (``gradnorm_postprocessor.py``) does the same with T = 1. pytorch-ood 0.4.0
    averages, as here, and returns the negation (higher = more OOD).

    No training pass: :meth:`finalize` only copies the head
    (:class:`~lightning_ood.detectors.ash.HeadOnlyDetector`).

    Nothing is accumulated: both hyperparameters enter :meth:`score` only; OpenOOD v1.5's
    ``gradnorm.yml`` sweeps nothing.
    """

    kind = "gradnorm"
    temperature = HParam(1.0, positive(), stage="score", doc="T > 0 (paper: 1)")
    include_bias = HParam(
        False,
        check_flag,
        stage="score",
        doc="add the bias gradient's L1 norm (default: weight only, as the paper)",
    )

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features)
        logits = h @ self.weight.T + self.bias
        return gradnorm_score(h, logits, self.temperature, self.include_bias)


__all__ = ["GradNorm", "gradnorm_score"]
