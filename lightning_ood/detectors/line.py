"""LINe: Leveraging Important Neurons (Ahn, Park & Kim, CVPR 2023).

The detector keeps, per class k, the neurons and classifier weights that contribute most to
class k on the training set, and scores a test sample by the energy of the logits recomputed
with only the neurons/weights important for its predicted class. See METHODS.md, "LINe".
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_ood.detectors.base import (
    Detector,
    OptInput,
    OptModel,
    Reducer,
    check_range,
    exporting,
)
from lightning_ood.models.base import BackboneOutput, OODBackbone

#: Upper bound on the number of elements of one chunk of per-class weight scores V_k built in
#: ``finalize`` (a few such chunks live at once, so the peak stays in the low hundreds of MB).
_CHUNK_ELEMENTS = 1 << 23


def row_percentile(x: Tensor, p: float) -> Tensor:
    """``numpy.percentile(x, p, axis=1)`` (linear interpolation) for a 2-D tensor.

    Same result as :func:`lightning_ood.detectors.base.percentile`, by a partial selection
    (``topk`` from the nearer end) instead of a full sort: the L weight-pruning thresholds range
    over L·q entries each (two million for an ImageNet head), and selection is ~5x faster.
    """
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"row_percentile needs a non-empty (rows, n) tensor, got {tuple(x.shape)}")
    n = x.shape[1]
    pos = (n - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    if hi < n - lo:  # the smallest hi+1 entries, ascending: s[lo], s[hi] at lo, hi
        v = x.topk(hi + 1, dim=1, largest=False).values
        a, b = v[:, lo], v[:, hi]
    else:  # the largest n-lo entries, descending: s[i] at n-1-i
        v = x.topk(n - lo, dim=1, largest=True).values
        a, b = v[:, n - 1 - lo], v[:, n - 1 - hi]
    return a + (b - a) * (pos - lo)


class LINe(Detector):
    """LINe detector: activation clipping + class-wise activation and weight pruning.

    Fitting (one eval-mode pass over the training set, ground-truth labels, unclipped
    features) estimates the contribution matrix C ∈ R^{q×L} (paper eq. 4–5):
    ``C[:, k] = mean_{x: y=k} h(x) ⊙ ∂f_k/∂h``, which for a linear head is
    ``W[k] ⊙ mean_{y=k} h(x)`` ("closed_form", no backward pass). ``"autograd"`` computes
    ``h ⊙ ∂f_y/∂h`` with one backward per batch through ``model.forward_head``; it is the oracle
    for the closed form and the path for heads that are not a single linear layer.

    Scoring (METHODS.md LINe 2–5): ĥ = min(h, δ); l = argmax(W ĥ + b);
    z = (W ⊙ M_w^l)(m_l ⊙ ĥ) + b; score = logsumexp(z). The L masked weight matrices are never
    materialised: the batch is grouped by predicted class and one L×q mask is built per group.

    Args:
        delta: activation clipping bound δ (upper bound only).
        p_a: percent of neurons pruned per class (activation pruning), in [0, 100).
        p_w: percent of the L·q weights pruned per class (weight pruning), in [0, 100).
        clip: apply activation clipping (AC).
        act_prune: apply activation pruning (AP).
        weight_prune: apply weight pruning (WP). The three switches are independent, as in the
            paper's Table 3 ablation; all three off is plain Energy.
        abs_contribution: use |C| for the activation masks as the paper writes; the reference
            code (default, False) uses the signed contribution. Weight pruning always uses |C|.
        contribution: ``"closed_form"`` (default) or ``"autograd"``.
        name: instance name (defaults to ``"line"``).
    """

    kind = "line"
    requires_fit = True
    #: ``update`` accumulates per-class sums that depend only on ``contribution``.
    finalize_only: ClassVar[frozenset[str]] = frozenset(
        {"delta", "p_a", "p_w", "clip", "act_prune", "weight_prune", "abs_contribution"}
    )

    def __init__(
        self,
        delta: float = 1.0,
        p_a: float = 90.0,
        p_w: float = 90.0,
        clip: bool = True,
        act_prune: bool = True,
        weight_prune: bool = True,
        abs_contribution: bool = False,
        contribution: Literal["closed_form", "autograd"] = "closed_form",
        name: str | None = None,
    ) -> None:
        super().__init__(name)
        owner = type(self).__name__
        self.delta = check_range("delta", delta, low=0.0, low_open=True, high=None, owner=owner)
        self.p_a = check_range("p_a", p_a, low=0.0, high=100.0, owner=owner)
        self.p_w = check_range("p_w", p_w, low=0.0, high=100.0, owner=owner)
        if contribution not in ("closed_form", "autograd"):
            raise ValueError(
                f"{owner}: contribution={contribution!r} is not supported; use 'closed_form' "
                "(linear heads, no backward pass) or 'autograd' (any differentiable head)"
            )
        self.clip = bool(clip)
        self.act_prune = bool(act_prune)
        self.weight_prune = bool(weight_prune)
        self.abs_contribution = bool(abs_contribution)
        self.contribution = contribution
        # Accumulators: per-class sums of h (closed form) or of h ⊙ ∂f_y/∂h (autograd), and
        # per-class sample counts; float64 so a million-sample sum stays exact enough.
        self.register_buffer("class_sum", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(0, dtype=torch.float64))
        # Derived scoring state.
        self.register_buffer("contribution_matrix", torch.zeros(0))  # C, (q, L)
        self.register_buffer("act_threshold", torch.zeros(0))  # percentile(C[:, k], p_a), (L,)
        self.register_buffer("act_mask", torch.zeros(0, dtype=torch.bool))  # m_k as rows, (L, q)
        self.register_buffer("weight_threshold", torch.zeros(0))  # t_k, (L,)
        self.register_buffer("weight", torch.zeros(0))  # W, (L, q)
        self.register_buffer("bias", torch.zeros(0))  # b, (L,)

    # -- fitting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop accumulated sums; the next :meth:`update` sizes them from the batch."""
        self.class_sum = self.class_sum.new_zeros(0)
        self.class_count = self.class_count.new_zeros(0)
        self.fitted.fill_(False)

    def _init_accumulators(self, num_classes: int, num_features: int, device: torch.device) -> None:
        self.class_sum = torch.zeros(num_classes, num_features, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add one batch's per-class sums (closed form: h; autograd: h ⊙ ∂f_y/∂h)."""
        h, logits = out.features, out.logits
        num_classes, num_features = logits.shape[1], h.shape[1]
        if self.class_sum.numel() == 0:
            self._init_accumulators(num_classes, num_features, h.device)
        elif self.class_sum.shape != (num_classes, num_features):
            raise ValueError(
                f"LINe.update: batch has {num_classes} classes x {num_features} features but the "
                f"accumulators hold {tuple(self.class_sum.shape)}; call reset() between models"
            )
        target = target.to(h.device).long()
        if target.shape != (h.shape[0],):
            raise ValueError(
                f"LINe.update: target must have shape ({h.shape[0]},) (one class index per "
                f"sample), got {tuple(target.shape)}"
            )
        if bool(((target < 0) | (target >= num_classes)).any()):
            raise ValueError(
                f"LINe.update: target holds labels outside [0, {num_classes}); LINe needs the "
                "ground-truth class index of every training sample"
            )
        if self.contribution == "autograd":
            if model is None:
                raise ValueError(
                    "LINe(contribution='autograd').update needs `model` (for forward_head)"
                )
            # The callback runs update under no_grad; the gradient w.r.t. h is needed here only.
            with torch.enable_grad():
                hg = h.detach().requires_grad_(True)
                selected = model.forward_head(hg).gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(selected, hg)
            values = hg.detach() * grad  # s_i(x) = a_i ∂f_y/∂a_i, paper eq. 5
        else:
            values = h.detach()
        self.class_sum.index_add_(0, target, values.to(torch.float64))
        self.class_count.index_add_(0, target, torch.ones_like(target, dtype=torch.float64))

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the class sums, derive C, the masks and thresholds, copy W and b.

        Extra memory is a few chunks of ``_CHUNK_ELEMENTS`` values whatever L: for an ImageNet
        head (L = 1000, q = 2048) about 110 MB of extra RSS and ~40 s on one CPU thread. The
        chunk buffer is reused and the selection is a ``topk``: with fresh buffers and
        ``kthvalue``, glibc malloc kept freed memory and the RSS grew to ~6 GB.
        """
        reducer = reducer or Reducer()
        clf = model.get_classifier()
        weight = clf.weight.detach().clone()
        num_classes, num_features = weight.shape
        bias = clf.bias.detach().clone() if clf.bias is not None else weight.new_zeros(num_classes)
        if self.class_sum.numel() == 0:  # a rank that saw no batch still joins the all-reduce
            self._init_accumulators(num_classes, num_features, weight.device)
        if self.class_sum.shape != (num_classes, num_features):
            raise ValueError(
                f"LINe.finalize: accumulated sums have shape {tuple(self.class_sum.shape)} but "
                f"the model's classifier is {num_classes} x {num_features}"
            )
        sums = reducer.sum(self.class_sum)
        counts = reducer.sum(self.class_count)
        empty = (counts == 0).nonzero().flatten().tolist()
        if len(empty) == num_classes:
            raise RuntimeError("LINe.finalize: no training sample was seen; run update() first")
        if empty:
            warnings.warn(
                f"LINe: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no training "
                "sample; their contributions are set to zero",
                stacklevel=2,
            )
        mean = sums / counts.clamp(min=1.0).unsqueeze(1)  # (L, q)
        if self.contribution == "closed_form":
            mean = weight.to(torch.float64) * mean  # C[:, k] = W[k] ⊙ mean_{y=k} h
        contrib = mean.T.contiguous().to(weight.dtype)  # (q, L)
        if self.abs_contribution:
            contrib = contrib.abs()

        # Activation pruning (METHODS.md LINe 3): per class, keep the neurons strictly above
        # the p_a percentile of that class's contributions.
        by_class = contrib.T  # (L, q): row k is C[:, k]
        act_threshold = row_percentile(by_class, self.p_a)
        act_mask = by_class > act_threshold[:, None]

        # Weight pruning (METHODS.md LINe 4): V_k = |C[:, k]|ᵀ ⊙ W over all L·q entries; only
        # the per-class thresholds t_k are kept (M_w^k is rebuilt at scoring from |C|, W, t_k),
        # computed a few classes at a time so no L×L×q tensor ever exists.
        if self.weight_prune:
            abs_c = by_class.abs()
            per_chunk = min(num_classes, max(1, _CHUNK_ELEMENTS // weight.numel()))
            work = weight.new_empty(per_chunk, *weight.shape)  # reused by every chunk
            weight_threshold = weight.new_empty(num_classes)
            for k0 in range(0, num_classes, per_chunk):
                c = abs_c[k0 : k0 + per_chunk]
                v = torch.mul(weight.unsqueeze(0), c.unsqueeze(1), out=work[: c.shape[0]])
                weight_threshold[k0 : k0 + c.shape[0]] = row_percentile(v.flatten(1), self.p_w)
        else:
            weight_threshold = weight.new_zeros(0)

        self.contribution_matrix = contrib
        self.act_threshold = act_threshold
        self.act_mask = act_mask
        self.weight_threshold = weight_threshold
        self.weight = weight
        self.bias = bias
        # The sums are not needed to score; drop them so checkpoints stay small.
        self.class_sum = self.class_sum.new_zeros(0)
        self.class_count = self.class_count.new_zeros(0)
        self.fitted.fill_(True)

    # -- scoring -------------------------------------------------------------------------
    def weight_mask(self, k: int) -> Tensor:
        """M_w^k = 1[|C[:, k]|ᵀ ⊙ W > t_k], shape (L, q) (METHODS.md LINe 4)."""
        self.check_fitted()
        if not self.weight_prune:
            return torch.ones_like(self.weight, dtype=torch.bool)
        # The same element-wise product as in finalize, so the mask matches t_k bit for bit.
        return self.weight * self.contribution_matrix[:, k].abs() > self.weight_threshold[k]

    def predict(self, h: Tensor) -> Tensor:
        """Predicted class on the (clipped) features with the full head, l = argmax(W ĥ + b)."""
        return (self._clip(h) @ self.weight.T + self.bias).argmax(dim=1)

    def _clip(self, h: Tensor) -> Tensor:
        return h.clamp(max=self.delta) if self.clip else h

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        """Energy of the pruned logits, logsumexp(z) (METHODS.md LINe 5); shape (B,)."""
        self.check_fitted()
        h = out.features
        if h.dim() != 2 or h.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"LINe.score: features must have shape (B, {self.weight.shape[1]}), got "
                f"{tuple(h.shape)}; was the detector fitted on another backbone?"
            )
        h = self._clip(h.to(self.weight.dtype))
        logits = h @ self.weight.T + self.bias
        if not (self.act_prune or self.weight_prune):
            return torch.logsumexp(logits, dim=1)
        pred = logits.argmax(dim=1)
        if exporting():
            return torch.logsumexp(self._pruned_logits_static(h, pred), dim=1)
        z = torch.empty_like(logits)
        weight = self.weight
        if self.weight_prune:
            # One reusable L×q work buffer and mask for all groups: bounded memory, and no
            # fresh multi-MB allocation (page faults) per predicted class.
            abs_c = self.contribution_matrix.T.abs()  # (L, q): row k is |C[:, k]|
            work = torch.empty_like(weight)
            keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
        # One group per predicted class, not one iteration per sample.
        for k in pred.unique().tolist():
            idx = (pred == k).nonzero().flatten()
            hk = h[idx]
            if self.act_prune:
                hk = hk * self.act_mask[k]
            w = weight
            if self.weight_prune:
                # M_w^k = 1[|C[:, k]|ᵀ ⊙ W > t_k], the same product as in finalize (bit-exact).
                torch.mul(weight, abs_c[k], out=work)
                torch.gt(work, self.weight_threshold[k], out=keep)
                w = torch.mul(weight, keep, out=work)  # W ⊙ M_w^k
            z[idx] = hk @ w.T + self.bias
        return torch.logsumexp(z, dim=1)

    def _pruned_logits_static(self, h: Tensor, pred: Tensor) -> Tensor:
        """Same logits as the grouped loop in :meth:`score`, with no data-dependent shapes:
        every class's pruned head is applied to the whole batch and the predicted class's row
        is kept. L matmuls of (B, q) x (q, L), for ``torch.export``; the eager path groups."""
        z = torch.zeros(h.shape[0], self.weight.shape[0], dtype=h.dtype, device=h.device)
        for k in range(self.weight.shape[0]):
            hk = h * self.act_mask[k] if self.act_prune else h
            w = self.weight * self.weight_mask(k) if self.weight_prune else self.weight
            z = torch.where((pred == k)[:, None], hk @ w.T + self.bias, z)
        return z
