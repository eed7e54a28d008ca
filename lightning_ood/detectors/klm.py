"""KL matching (Hendrycks et al., ICML 2022, "Scaling Out-of-Distribution Detection for
Real-World Settings", §4).

For each class k the template d_k is the mean softmax posterior of the training samples the
network *predicts* as k (no labels needed); the anomaly score is the divergence from the
closest template, ``min_k KL[p(x) ‖ d_k]``, and the confidence returned here is its negation
(higher = more ID). The direction KL[p ‖ d_k] (the test posterior first) is the paper's, and
that of OpenOOD v1.5 (``scipy.stats.entropy(p, d_k)``) and pytorch-ood's ``KLMatching``
(docs/methods.md#klm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone


def kl_to_templates(logits: Tensor, templates: Tensor) -> Tensor:
    """KL[softmax(f) ‖ d_k] for every row of ``logits`` (B, L) and template d_k (rows of
    ``templates``, (K, L)), (B, K) float64: ``Σ_j p_j log p_j - Σ_j p_j log d_kj`` with
    ``0 log 0 = 0``; a template entry 0 where p_j > 0 gives +inf."""
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    neg_entropy = (p * logp).sum(dim=1, keepdim=True)  # p = 0 rows of logp are finite
    # -inf * 0 would be NaN: the lowest finite value keeps p_j = 0 terms at 0 and makes
    # p_j > 0 against d_kj = 0 overflow to -inf, i.e. KL = +inf.
    log_d = templates.double().log().clamp_min(torch.finfo(torch.float64).min)
    return neg_entropy - p @ log_d.T


@register_detector
class KLM(Detector):
    """KL matching: minus the KL divergence of the softmax posterior to the closest class
    template d_k (mean posterior of the training samples predicted as k).

    Fitting streams float64 per-predicted-class sums of softmax posteriors and counts, reduced
    across DDP ranks in :meth:`finalize`. A class that no training sample is predicted as has
    no template and is left out of the minimum (pytorch-ood; OpenOOD's placeholder one-hot
    template gives an infinite divergence to any non-one-hot posterior, the same result).
    The templates come from the training pass every detector shares; the paper and OpenOOD
    v1.5 take them from held-out ID validation images (docs/methods.md#klm).
    """

    kind = "klm"
    requires_fit = True
    # No hyperparameter (OpenOOD v1.5 ``klm.yml`` has no sweep).

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("prob_sum", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("pred_count", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("templates", torch.zeros(0, 0, dtype=f64))  # d_k, (K, L)
        self.register_buffer("template_classes", torch.zeros(0, dtype=torch.long))  # k of each

    def reset(self) -> None:
        dev = self.fitted.device
        self.prob_sum = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.pred_count = torch.zeros(0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add the posteriors of the batch to the sum of their predicted class."""
        f = out.logits.detach()
        if f.dim() != 2:
            raise ValueError(f"{self.name}: logits must be (B, L), got {tuple(f.shape)}")
        n_classes = f.shape[1]
        if self.prob_sum.numel() == 0:
            self.prob_sum = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=f.device)
            self.pred_count = torch.zeros(n_classes, dtype=torch.float64, device=f.device)
        elif self.prob_sum.shape[0] != n_classes:
            raise ValueError(
                f"{self.name}: the number of classes changed from {self.prob_sum.shape[0]} to "
                f"{n_classes} during fitting"
            )
        p = torch.softmax(f.double(), dim=1)
        pred = f.argmax(dim=1)
        self.prob_sum.index_add_(0, pred, p)
        self.pred_count += torch.bincount(pred, minlength=n_classes).double()

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums; the templates are the means of the predicted classes."""
        reducer = reducer or Reducer()
        if self.prob_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            n_classes, dev = model.num_classes, self.fitted.device
            self.prob_sum = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=dev)
            self.pred_count = torch.zeros(n_classes, dtype=torch.float64, device=dev)
        sums = reducer.sum(self.prob_sum.clone())
        counts = reducer.sum(self.pred_count.clone())
        if float(counts.sum()) == 0:
            raise RuntimeError(f"{self.name}: finalize() before any update(); no training data")
        seen = torch.nonzero(counts > 0).flatten()
        self.templates = sums[seen] / counts[seen, None]
        self.template_classes = seen
        self.fitted.fill_(True)

    def divergences(self, logits: Tensor) -> Tensor:
        """KL[p(x) ‖ d_k] for every template, (B, K) float64."""
        self.check_fitted()
        if logits.dim() != 2 or logits.shape[1] != self.templates.shape[1]:
            raise ValueError(
                f"{self.name}: logits must have shape (B, {self.templates.shape[1]}), got "
                f"{tuple(logits.shape)}; was the detector fitted on another backbone?"
            )
        return kl_to_templates(logits, self.templates)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.divergences(out.logits).min(dim=1).values


__all__ = ["KLM", "kl_to_templates"]
