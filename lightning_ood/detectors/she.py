"""SHE, simplified Hopfield energy (Zhang et al., ICLR 2023, "Out-of-Distribution Detection
based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy").

Each class k stores one pattern s_k, the mean penultimate feature of the training samples of
class k that the network classifies correctly; a test feature h is compared with the pattern
of its predicted class ŷ: the score is ``⟨h, s_ŷ⟩`` (the negated simplified energy, higher =
more ID), as OpenOOD v1.5 ``she_postprocessor.py`` (metric ``inner_product``) and pytorch-ood's
``SHE`` (negated there) compute it (docs/methods.md#she).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector, OptInput, OptModel, Reducer
from lightning_ood.detectors.hparams import HParam, boolean, choice
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

METRICS = ("inner_product", "euclidean", "cosine")


@register_detector
class SHE(Detector):
    """⟨h, s_ŷ⟩ with s_k the mean feature of the correctly classified training samples of k.

    Fitting streams float64 per-class feature sums and counts (reduced across DDP ranks in
    :meth:`finalize`). ``metric`` picks OpenOOD's alternatives to the inner product: minus the
    Euclidean distance ``-‖h - s_ŷ‖`` or the cosine similarity.
    """

    kind = "she"
    requires_fit = True
    metric = HParam(
        "inner_product",
        choice(*METRICS),
        search=METRICS,
        stage="score",
        doc="similarity of h to its pattern: inner_product (paper), euclidean (minus the "
        "distance) or cosine (OpenOOD's options)",
    )
    correct_only = HParam(
        True,
        boolean(),
        doc="patterns from the correctly classified training samples (paper); false: every "
        "training sample of the class",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        # Accumulators are non-persistent: checkpoints carry only what scoring needs.
        self.register_buffer("class_sum", torch.zeros(0, 0, dtype=f64), persistent=False)
        self.register_buffer("class_count", torch.zeros(0, dtype=f64), persistent=False)
        self.register_buffer("patterns", torch.zeros(0, 0, dtype=f64))  # s_k, (L, q)

    def reset(self) -> None:
        dev = self.fitted.device
        self.class_sum = torch.zeros(0, 0, dtype=torch.float64, device=dev)
        self.class_count = torch.zeros(0, dtype=torch.float64, device=dev)
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add the features of the (correctly classified) samples to their class sums."""
        h = out.features.detach()
        y = target.reshape(-1).long().to(h.device)
        n_classes = out.logits.shape[1]
        if h.dim() != 2 or h.shape[0] != y.shape[0]:
            raise ValueError(
                f"{self.name}: features {tuple(h.shape)} and targets {tuple(y.shape)} must be "
                "(B, q) and (B,)"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(
                f"{self.name}: targets must be class indices in [0, {n_classes}) (logits width), "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        if self.class_sum.numel() == 0:
            self.class_sum = torch.zeros(
                n_classes, h.shape[1], dtype=torch.float64, device=h.device
            )
            self.class_count = torch.zeros(n_classes, dtype=torch.float64, device=h.device)
        elif self.class_sum.shape != (n_classes, h.shape[1]):
            raise ValueError(
                f"{self.name}: (classes, features) changed from {tuple(self.class_sum.shape)} "
                f"to {(n_classes, h.shape[1])} during fitting"
            )
        if self.correct_only:
            keep = out.logits.detach().argmax(dim=1) == y
            h, y = h[keep], y[keep]
        self.class_sum.index_add_(0, y, h.double())
        self.class_count += torch.bincount(y, minlength=n_classes).double()

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums; the patterns are the class means."""
        reducer = reducer or Reducer()
        if self.class_sum.numel() == 0:  # a rank that saw no batch still joins the sums
            q, n_classes, dev = model.num_features, model.num_classes, self.fitted.device
            self.class_sum = torch.zeros(n_classes, q, dtype=torch.float64, device=dev)
            self.class_count = torch.zeros(n_classes, dtype=torch.float64, device=dev)
        sums = reducer.sum(self.class_sum.clone())
        counts = reducer.sum(self.class_count.clone())
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:
            which = "correctly classified " if self.correct_only else ""
            raise ValueError(
                f"{self.name}: classes {empty} have no {which}training sample, so their stored "
                "patterns are undefined; fit on a set that covers every class"
                + (" or set correct_only: false" if self.correct_only else "")
            )
        self.patterns = sums / counts[:, None]
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        self.check_fitted()
        h = out.features
        if h.dim() != 2 or h.shape[1] != self.patterns.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {self.patterns.shape[1]}), got "
                f"{tuple(h.shape)}; was the detector fitted on another backbone?"
            )
        h = h.double()
        s = self.patterns.double()[out.logits.argmax(dim=1)]
        if self.metric == "inner_product":
            return (h * s).sum(dim=1)
        if self.metric == "euclidean":
            return -(h - s).norm(dim=1)
        return torch.cosine_similarity(h, s, dim=1)


__all__ = ["METRICS", "SHE"]
