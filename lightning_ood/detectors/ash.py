"""ASH (Djurisic et al., ICLR 2023, "Extremely Simple Activation Shaping for Out-of-Distribution
Detection"): prune each sample's penultimate activations below that sample's own percentile,
reshape the survivors, and score the energy of the head's logits of the shaped feature.

The per-sample top-k helpers (:func:`kept_count`, :func:`top_activations`,
:func:`shaping_ratio`) are shared with SCALE (:mod:`lightning_ood.detectors.scale`), and
:class:`HeadOnlyDetector` (fitting = copying the head) with SCALE and GradNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ood.detectors.base import OptInput, OptModel, Reducer
from lightning_ood.detectors.energy import energy_score
from lightning_ood.detectors.hparams import HParam, choice, in_range, positive
from lightning_ood.detectors.linear_head import LinearHeadDetector
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

VARIANTS = ("p", "b", "s")

#: OpenOOD v1.5 ``configs/postprocessors/ash.yml`` (and ``scale.yml``): ``percentile_list``.
PERCENTILE_SWEEP: tuple[float, ...] = (65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0)


def kept_count(n: int, percentile: float) -> int:
    """How many of a sample's ``n`` activations survive pruning at ``percentile``.

    ``k = n − round(n·p/100)``, the reference's count (``ash.py`` of the ASH authors, also
    OpenOOD's ``ash_net.py`` and pytorch-ood): Python's ``round`` rounds half to even like the
    reference's ``np.round``, so ``n = 6, p = 75`` keeps 2, not 1. Unlike the reference, at
    least one activation is kept (the reference divides by zero when ``round(n·p/100) = n``,
    e.g. ``n = 8, p = 95``). This is a count, not a threshold: for ``n = 4, p = 65`` one value
    survives, where "above numpy's interpolated 65th percentile" would keep two.
    """
    return max(1, n - round(n * percentile / 100.0))


def top_activations(h: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    """Values and indices of each row's :func:`kept_count` largest entries, shape (B, k).

    Ties at the cut are broken by ``torch.topk`` (as in the reference).
    """
    return h.topk(kept_count(h.shape[1], percentile), dim=1)


def shaping_ratio(h: Tensor, top_values: Tensor) -> Tensor:
    """Per sample ``s1 / s2``: the sum of all activations over the sum of the kept ones.

    ASH-S and SCALE multiply by ``exp(s1 / s2)``. Where the kept sum is 0 (an all-zero
    feature: a dead ReLU layer) the ratio is taken as 0, a factor of 1, instead of the
    reference's NaN; the shaped feature is then zero whatever the factor.
    """
    s1 = h.sum(dim=1)
    s2 = top_values.sum(dim=1)
    zero = s2 == 0
    ratio = s1 / torch.where(zero, torch.ones_like(s2), s2)
    return torch.where(zero, torch.zeros_like(ratio), ratio)


class HeadOnlyDetector(LinearHeadDetector):
    """Linear-head detectors whose only fitted state is the copy of the head (W, b).

    ``requires_fit`` (the head is copied at :meth:`finalize`) but no training batch is read
    (``uses_training_data`` False, as FSSD or a fixed-clip ReAct): fitting needs the model
    only, and every hyperparameter is finalize-only.
    """

    uses_training_data = False

    def reset(self) -> None:
        self.fitted.fill_(False)

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Copy the classifier head; nothing else is fitted."""
        self._copy_head(model)
        self.fitted.fill_(True)


@register_detector
class ASH(HeadOnlyDetector):
    """ASH: energy of the logits of the activation-shaped penultimate feature.

    For each sample, ``k = n − round(n·p/100)`` of its ``n`` feature values survive (its own
    top ``100 − p`` percent, :func:`kept_count`; no training statistics), the rest are set to
    0, and the survivors are (the paper's three variants, as its reference code computes them):

    * ``"p"`` (ASH-P): kept as they are;
    * ``"b"`` (ASH-B): all set to ``s1 / k`` with ``s1`` the sum of the unpruned feature
      (binarised, the sum preserved);
    * ``"s"`` (ASH-S): the pruned feature multiplied by ``exp(s1 / s2)``, ``s2`` the sum of the
      kept values.

    The score is the energy ``T·logsumexp((W a + b)/T)`` of the shaped feature ``a`` through a
    copy of the head (as ReAct: the paper scores with energy, T = 1).

    Where ASH is applied: to the penultimate feature ``h`` of the backbone contract, i.e.
    AFTER the global average pool, shape (B, q). That is where the authors' code applies it
    (``apply_ash`` after ``self.avgpool`` in ``models/resnet_imagenet.py``) and where OpenOOD
    v1.5 does (``ash_net.py``: on ``feature_list[-1]``, the pooled (B, C, 1, 1) map). ASH
    inside the last residual blocks (the authors' ``use_ash`` switches shape a block's output
    before its last ReLU) is not offered: it needs the backbone's internals, not the contract.

    No training pass: :meth:`finalize` only copies the head (:class:`HeadOnlyDetector`), so a
    fitting call needs the model only.

    Nothing is accumulated: every hyperparameter enters :meth:`score` only. Default variant
    ``"s"``: the authors' configs (``config/cifar10_config.yml``, ``imagenet_config.yml``:
    ``ash_s@90``); OpenOOD v1.5's ASHNet always applies ASH-B.
    """

    kind = "ash"
    variant = HParam("s", choice(*VARIANTS), stage="score", doc='"p", "b" or "s" (ASH-P/B/S)')
    #: OpenOOD v1.5 ``ash.yml`` sweep (the variant is not swept there).
    percentile = HParam(
        90.0,
        in_range(0.0, 100.0),
        search=PERCENTILE_SWEEP,
        stage="score",
        doc="percent p of each sample's activations pruned, in [0, 100) (90: OpenOOD v1.5, "
        "the authors' configs)",
    )
    temperature = HParam(1.0, positive(), stage="score", doc="energy temperature T > 0")

    def shaped(self, h: Tensor) -> Tensor:
        """The shaped feature ``a`` of each row of ``h`` (B, q), per :attr:`variant`."""
        values, index = top_activations(h, self.percentile)
        if self.variant == "b":
            fill = (h.sum(dim=1) / values.shape[1]).unsqueeze(1).expand_as(values)
            return torch.zeros_like(h).scatter(1, index, fill)
        pruned = torch.zeros_like(h).scatter(1, index, values)
        if self.variant == "p":
            return pruned
        return pruned * shaping_ratio(h, values).exp().unsqueeze(1)

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        h = self._check_features(out.features)
        return energy_score(self.shaped(h) @ self.weight.T + self.bias, self.temperature)


__all__ = [
    "ASH",
    "PERCENTILE_SWEEP",
    "VARIANTS",
    "HeadOnlyDetector",
    "kept_count",
    "shaping_ratio",
    "top_activations",
]
