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

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.class_stats import ClassMomentsDetector, require_every_class
from lightning_ood.detectors.hparams import HParam, boolean, choice
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

METRICS = ("inner_product", "euclidean", "cosine")


@register_detector
class SHE(ClassMomentsDetector):
    """⟨h, s_ŷ⟩ with s_k the mean feature of the correctly classified training samples of k.

    Fitting streams float64 per-class feature sums and counts
    (:class:`~lightning_ood.detectors.class_stats.ClassMomentsDetector`, reduced across DDP
    ranks in :meth:`finalize`). ``metric`` picks OpenOOD's alternatives to the inner product:
    minus the Euclidean distance ``-‖h - s_ŷ‖`` or the cosine similarity.
    """

    kind = "she"
    second_moment = False  # class means only
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
        self.register_buffer("patterns", torch.zeros(0, 0, dtype=torch.float64))  # s_k, (L, q)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        """Add the features of the (correctly classified) samples to their class sums."""
        self.add_class_moments(
            out, target, out.features.detach(), correct_only=bool(self.correct_only)
        )

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """All-reduce the sums; the patterns are the class means."""
        counts, sums, _ = self.reduced_class_moments(model, reducer or Reducer())
        require_every_class(
            self.name, counts, what="stored patterns", correct_only=bool(self.correct_only)
        )
        self.patterns = sums / counts[:, None]
        self.fitted.fill_(True)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self.checked_features(out.features, self.patterns)
        h = h.double()
        s = self.patterns.double()[out.logits.argmax(dim=1)]
        if self.metric == "inner_product":
            return (h * s).sum(dim=1)
        if self.metric == "euclidean":
            return -(h - s).norm(dim=1)
        return torch.cosine_similarity(h, s, dim=1)


__all__ = ["METRICS", "SHE"]
