"""Relation (Kim et al., NeurIPS 2023, "Neural Relation Graph: A Unified Framework for
Identifying Label Noise and Outlier Data"): the summed edge weight of a test sample in the
relation graph over (a seeded fraction of) the training set.

Nodes carry the L2-normalised feature z = h/‖h‖ and the softmax probabilities p; the relation
kernel (paper Sec. 3, the ``cos_p`` kernel of the authors' code) is

    k(x, x_j) = max(0, ⟨z, z_j⟩) · ⟨p, p_j⟩,

edges weaker than ``edge_threshold`` are cut, and the OOD score is the total relation of x,

    S(x) = Σ_j 1{k(x, x_j) > τ} · k(x, x_j)^t        (higher = more ID; t = ``pow``)

which OpenOOD v1.5 (``relation_postprocessor.py``, code from the authors) returns as the
confidence; the authors' script reports ``1 / (S + 1e-6)`` as the outlier score, the same
ranking. The bank (z and p of the training samples) follows
:class:`~lightning_ood.detectors.knn.BankDetector`'s conventions (``bank_fraction``, ``seed``,
``store_bank``, ``min_bank``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, exporting
from lightning_ood.detectors.hparams import HParam, in_range, positive
from lightning_ood.detectors.knn import BankDetector, normalize_rows
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput


def relation_sum(
    z: Tensor,
    p: Tensor,
    bank_z: Tensor,
    bank_p: Tensor,
    power: float,
    threshold: float,
    bank_chunk: int = 16384,
) -> Tensor:
    """Σ_j 1{k_j > τ} k_j^t with k_j = max(0, z·z_j)(p·p_j), per row of ``z``/``p``; the bank
    is read in chunks of ``bank_chunk`` rows, the sums kept in float64. (B,)"""
    total = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
    for bs in range(0, bank_z.shape[0], bank_chunk):
        rel = (z @ bank_z[bs : bs + bank_chunk].T).clamp_min(0.0)
        rel = rel * (p @ bank_p[bs : bs + bank_chunk].T)
        kept = torch.where(rel > threshold, rel.pow(power), torch.zeros_like(rel))
        total = total + kept.sum(dim=1, dtype=torch.float64)
    return total


@register_detector
class Relation(BankDetector):
    """Relation graph score: summed thresholded kernel ``max(0, z·z_j)(p·p_j)`` raised to
    ``pow`` over the bank (docs/methods.md#relation).

    The bank rows are ``[z, p]`` (features then probabilities) of each kept training sample.
    Scoring costs one pass over the bank per query chunk: O(B · N · (q + C)).
    """

    kind: ClassVar[str] = "relation"
    #: OpenOOD v1.5 ``configs/postprocessors/relation.yml``: ``pow_list: [1, 2, 4, 6, 8]``.
    pow = HParam(
        1.0, positive(), search=(1.0, 2.0, 4.0, 6.0, 8.0), stage="score",
        doc="t: power of the kernel (the authors' 'temperature'; 1 for OOD detection)",
    )  # fmt: skip
    edge_threshold = HParam(
        0.03, in_range(0.0), stage="score",
        doc="τ: edges with kernel value at or below it are cut (0.03 in the authors' code)",
    )  # fmt: skip
    # No neighbour search: the bank's k and search backend do not apply (plain attributes
    # replace the inherited declarations). The authors use every training sample.
    k: ClassVar[int] = 1  # type: ignore[assignment]
    backend: ClassVar[str] = "torch"  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def bank_rows(self, out: BackboneOutput) -> Tensor:
        """[z, p]: the normalised features and the softmax probabilities, (B, q + C)."""
        h = out.features
        return torch.cat([normalize_rows(h), out.logits.to(h.dtype).softmax(dim=1)], dim=1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        bank = self._require_bank()
        h, logits = out.features, out.logits
        q = h.shape[1]
        if h.dim() != 2 or q + logits.shape[1] != bank.shape[1]:
            raise ValueError(
                f"{self.name}: features (B, q) and logits (B, C) must have q + C = "
                f"{bank.shape[1]} columns (the bank's), got {tuple(h.shape)} and "
                f"{tuple(logits.shape)}; was the detector fitted on another backbone?"
            )
        z = normalize_rows(h).to(bank.dtype)
        p = logits.to(bank.dtype).softmax(dim=1)
        bank_z, bank_p = bank[:, :q], bank[:, q:]
        if exporting():  # traced: the whole batch as one chunk
            return relation_sum(
                z, p, bank_z, bank_p, self.pow, self.edge_threshold, self.bank_chunk
            )
        if z.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64, device=z.device)
        parts = [
            relation_sum(zc, pc, bank_z, bank_p, self.pow, self.edge_threshold, self.bank_chunk)
            for zc, pc in zip(z.split(self.query_chunk), p.split(self.query_chunk), strict=True)
        ]
        return torch.cat(parts)


__all__ = ["Relation", "relation_sum"]
