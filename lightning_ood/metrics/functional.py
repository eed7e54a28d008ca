"""Exact OOD-detection metrics on raw scores: pure torch, float64, no binning, no sigmoid.

Every function takes ``scores_id`` (N_ID,) and ``scores_ood`` (N_OOD,) where a **higher score
means more in-distribution** (the detector contract). Unless a name says otherwise the
**in-distribution set is the positive class**, the convention of the LINe, DICE, ODIN and FSSD
papers; OpenOOD and pytorch-ood report FPR@95 with OOD positive, which is ``fpr95_oodpos`` here.

Why not torchmetrics' ``binary_roc``/``binary_auroc``/``binary_average_precision``: they treat
any input with values outside [0, 1] as logits and pass it through a sigmoid (in the input
dtype, so float32 energies above ~17 all become exactly 1.0 and tie), and with ``thresholds=``
they bin the scores on a fixed [0, 1] grid. Raw OOD scores (energies, negative distances, FSSD)
must be ranked as they are. Everything below sorts the scores once (O(N log N)), counts with
``cumsum`` in int64 and divides at the end, so results are exact up to one float64 rounding.

Ties: equal scores form one threshold group (a detector cannot separate them), as in
scikit-learn's ``roc_curve``; AUROC therefore counts an ID/OOD tie as 1/2.

CCR@FPR (:func:`ccr_at_fpr`, OpenOOD's open-set metric) also needs, per ID sample, whether the
classifier's prediction equals its label (``correct_id``); its keys are :data:`CCR_NAMES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CCR_CONVENTIONS",
    "CCR_FPRS",
    "CCR_NAMES",
    "LOWER_IS_BETTER",
    "METRIC_CONVENTIONS",
    "METRIC_NAMES",
    "aupr_in",
    "aupr_out",
    "auroc",
    "ccr_at_fpr",
    "ccr_metric_tensors",
    "ccr_metrics",
    "ccr_name",
    "detection_accuracy",
    "fpr_at_tpr",
    "ood_metric_tensors",
    "ood_metrics",
    "roc_counts",
    "roc_curve",
]

ScoresLike = Tensor | np.ndarray | Sequence[float]

#: Keys of :func:`ood_metrics`, in table order.
METRIC_NAMES: tuple[str, ...] = (
    "fpr95",
    "fpr80",
    "fpr95_oodpos",
    "auroc",
    "aupr_in",
    "aupr_out",
    "detection_acc",
)

#: One-line description of each key of :func:`ood_metrics` (for table headers and logs).
METRIC_CONVENTIONS: dict[str, str] = {
    "fpr95": "FPR at 95% TPR, ID positive: fraction of OOD kept when 95% of ID is kept",
    "fpr80": "FPR at 80% TPR, ID positive: fraction of OOD kept when 80% of ID is kept",
    "fpr95_oodpos": "FPR at 95% TPR, OOD positive: fraction of ID flagged at 95% of OOD caught",
    "auroc": "AUROC, ID positive (ties count 1/2); symmetric in the choice of positive class",
    "aupr_in": "AUPR-In: average precision with ID positive (sklearn average_precision_score)",
    "aupr_out": "AUPR-Out: average precision with OOD positive, scores negated",
    "detection_acc": "Detection accuracy: max over thresholds of 0.5*(TPR + TNR), ID positive",
}

#: Metrics where lower is better (the selection rule and the table arrows read it).
LOWER_IS_BETTER = frozenset({"fpr95", "fpr80", "fpr95_oodpos"})

Positive = Literal["id", "ood"]
FPRMethod = Literal["roc", "reference"]
CCRMethod = Literal["roc", "openood"]


# -- input checks ------------------------------------------------------------------------------
def _as_scores(x: ScoresLike, name: str, set_name: str) -> Tensor:
    """Validate one score vector and return it as float64 (on its own device)."""
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a 1-D tensor/array of scores, got {type(x).__name__}"
            ) from err
    if t.is_complex() or not (t.is_floating_point() or t.dtype == torch.bool or _is_int(t)):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D with shape (N,), got shape {tuple(t.shape)}; pass one score "
            "per sample (flatten it or select the score column)"
        )
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: the {set_name} set has no samples to evaluate")
    t = t.to(torch.float64)
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name} ({set_name} set) contains {n_nan} NaN and {n_inf} Inf value(s) out of "
            f"{t.numel()}; non-finite scores cannot be ranked, fix the detector or drop them"
        )
    return t


def _is_int(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _check_tpr(tpr: float) -> float:
    tpr = float(tpr)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1] (a fraction, e.g. 0.95 not 95), got {tpr}")
    return tpr


def _pos_neg(
    scores_id: ScoresLike, scores_ood: ScoresLike, positive: Positive
) -> tuple[Tensor, Tensor]:
    """Validated (positive, negative) scores, negated when OOD is the positive class."""
    sid = _as_scores(scores_id, "scores_id", "ID")
    sood = _as_scores(scores_ood, "scores_ood", "OOD")
    if positive == "id":
        return sid, sood
    if positive == "ood":
        return -sood, -sid
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


# -- curve -------------------------------------------------------------------------------------
def _roc_counts(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (TP, FP) counts per distinct threshold, highest threshold first.

    A sample is predicted positive when its score is >= the threshold. Entry 0 is the empty
    prediction (0, 0); the last entry is (P, N). Equal scores share one entry.
    """
    scores = torch.cat([pos, neg])
    is_pos = torch.cat(
        [
            torch.ones(pos.numel(), dtype=torch.int64, device=pos.device),
            torch.zeros(neg.numel(), dtype=torch.int64, device=pos.device),
        ]
    )
    s, order = torch.sort(scores, descending=True, stable=True)
    tp = torch.cumsum(is_pos[order], 0)
    fp = torch.arange(1, s.numel() + 1, device=s.device) - tp
    # Last index of each run of equal scores = end of a threshold group.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    zero = torch.zeros(1, dtype=torch.int64, device=s.device)
    return torch.cat([zero, tp[last]]), torch.cat([zero, fp[last]])


def roc_counts(
    scores_id: ScoresLike, scores_ood: ScoresLike, positive: Positive = "id"
) -> tuple[Tensor, Tensor]:
    """Exact ROC as integer counts: ``(tp, fp)``, int64, highest threshold first.

    ``tp / n_pos`` and ``fp / n_neg`` equal scikit-learn's ``roc_curve(...,
    drop_intermediate=False)`` TPR/FPR (including its leading (0, 0) point).
    """
    pos, neg = _pos_neg(scores_id, scores_ood, positive)
    return _roc_counts(pos, neg)


def roc_curve(
    scores_id: ScoresLike, scores_ood: ScoresLike, positive: Positive = "id"
) -> tuple[Tensor, Tensor]:
    """Exact ROC curve ``(fpr, tpr)`` in float64, from (0, 0) to (1, 1), for plotting.

    One point per distinct score (no thinning), the same points as sklearn's
    ``roc_curve(..., drop_intermediate=False)``.
    """
    tp, fp = roc_counts(scores_id, scores_ood, positive)
    return fp.to(torch.float64) / float(fp[-1]), tp.to(torch.float64) / float(tp[-1])


# -- metrics on validated tensors ---------------------------------------------------------------
def _auroc(tp: Tensor, fp: Tensor) -> Tensor:
    # Trapezoid rule on integer counts: sum dF * (T_k + T_{k-1}) / (2 P N). Equivalent to the
    # Mann-Whitney U statistic with ties counting 1/2; exact in int64, one final division.
    p, n = int(tp[-1]), int(fp[-1])
    twice_area = ((fp[1:] - fp[:-1]) * (tp[1:] + tp[:-1])).sum()
    return twice_area.to(torch.float64) / (2.0 * p * n)


def _average_precision(tp: Tensor, fp: Tensor) -> Tensor:
    # AP = sum_k (R_k - R_{k-1}) P_k over threshold groups (step interpolation, no trapezoid),
    # the definition of sklearn's average_precision_score.
    tp_, fp_ = tp[1:].to(torch.float64), fp[1:].to(torch.float64)
    precision = tp_ / (tp_ + fp_)
    d_recall = (tp[1:] - tp[:-1]).to(torch.float64) / float(tp[-1])
    return (d_recall * precision).sum()


def _detection_accuracy(tp: Tensor, fp: Tensor) -> Tensor:
    tpr = tp.to(torch.float64) / float(tp[-1])
    tnr = 1.0 - fp.to(torch.float64) / float(fp[-1])
    return (0.5 * (tpr + tnr)).max()


def _fpr_at_tpr_roc(pos: Tensor, neg: Tensor, tpr: float) -> Tensor:
    # First ROC point (highest threshold) with TP / P >= tpr. That point's threshold is the
    # k-th largest positive score with k = min{k : k / P >= tpr}: no higher threshold keeps k
    # positives. The ratio is compared exactly as sklearn's tps / tps[-1] >= tpr.
    p = pos.numel()
    ratios = torch.arange(1, p + 1, dtype=torch.float64, device=pos.device) / p
    k = int(torch.searchsorted(ratios, torch.tensor([tpr], dtype=torch.float64, device=pos.device)))
    thr = torch.sort(pos, descending=True).values[k]
    return (neg >= thr).sum().to(torch.float64) / neg.numel()


def _reference_index(n: int, tpr: float) -> int:
    # The reference writes round(0.05 * num_k). 1 - 0.95 is 0.050000000000000044 in binary,
    # which flips round-half cases (n = 10: 0.5 -> 0, but 0.5000000000000004 -> 1), so the
    # miss rate is rounded to 12 decimals first to reproduce the literal. Python's round()
    # rounds halves to even, as in the reference. Clamped so tiny tpr cannot index past the end.
    return min(round(round(1.0 - tpr, 12) * n), n - 1)


def _fpr_at_tpr_reference(pos: Tensor, neg: Tensor, tpr: float) -> Tensor:
    thr = torch.sort(pos).values[_reference_index(pos.numel(), tpr)]
    return (neg > thr).sum().to(torch.float64) / neg.numel()


# -- public API --------------------------------------------------------------------------------
def fpr_at_tpr(
    scores_id: ScoresLike,
    scores_ood: ScoresLike,
    tpr: float = 0.95,
    *,
    positive: Positive = "id",
    method: FPRMethod = "roc",
) -> Tensor:
    """False-positive rate at the threshold that keeps ``tpr`` of the positive class.

    With ``positive="id"`` (papers' FPR95/FPR80) this is the fraction of OOD samples accepted
    as ID while ``tpr`` of the ID samples are accepted. With ``positive="ood"`` the scores are
    negated and it is the fraction of ID samples flagged when ``tpr`` of the OOD set is caught
    (OpenOOD / pytorch-ood FPR@95).

    Methods:
        ``"roc"`` (default): exact ROC. The FPR of the first ROC point, from the highest
        threshold down, whose TPR >= ``tpr``; a sample is accepted when ``score >= thr``, ties
        grouped. Equals ``fpr[np.argmax(tpr_curve >= tpr)]`` from sklearn's
        ``roc_curve(drop_intermediate=False)``. The achieved TPR is never below ``tpr``.

        ``"reference"``: the LINe/DICE/ReAct code (``util/metrics.py``, ``get_curve``):
        ``thr = sort(pos)[round((1 - tpr) * N_pos)]`` (ascending sort, index clamped to
        N_pos - 1) and FPR = mean(neg > thr), a **strict** ``>`` because that is what the
        reference computes (``np.sum(novel > threshold)``) and so what produced the published
        numbers; with saturated scores (e.g. MSP = 1.0 for many samples) ``>`` and ``>=``
        differ a lot.

    Relation: the reference index is ``round`` where the exact one is ``floor`` of
    (1 - tpr) * N_pos, so the reference threshold is the same or one positive-rank higher and
    ``FPR_exact - FPR_reference = mean(thr_exact <= neg <= thr_reference) >= 0``. They agree
    whenever (1 - tpr) * N_pos has fractional part < 0.5 (e.g. N_pos a multiple of 20 at 95 %)
    and no negative score equals the threshold; otherwise the reference may keep slightly less
    than ``tpr`` of the positives.

    Returns:
        0-d float64 tensor in [0, 1].
    """
    tpr = _check_tpr(tpr)
    pos, neg = _pos_neg(scores_id, scores_ood, positive)
    if method == "roc":
        return _fpr_at_tpr_roc(pos, neg, tpr)
    if method == "reference":
        return _fpr_at_tpr_reference(pos, neg, tpr)
    raise ValueError(f"method must be 'roc' or 'reference', got {method!r}")


def auroc(scores_id: ScoresLike, scores_ood: ScoresLike) -> Tensor:
    """Area under the ROC curve, ID positive; an ID/OOD tie counts 1/2 (= P(s_id > s_ood)).

    Equal to sklearn's ``roc_auc_score``; swapping the positive class and negating the scores
    gives the same value.
    """
    tp, fp = roc_counts(scores_id, scores_ood, "id")
    return _auroc(tp, fp)


def aupr_in(scores_id: ScoresLike, scores_ood: ScoresLike) -> Tensor:
    """AUPR-In: average precision with ID positive (sklearn ``average_precision_score``)."""
    tp, fp = roc_counts(scores_id, scores_ood, "id")
    return _average_precision(tp, fp)


def aupr_out(scores_id: ScoresLike, scores_ood: ScoresLike) -> Tensor:
    """AUPR-Out: average precision with OOD positive and the scores negated."""
    tp, fp = roc_counts(scores_id, scores_ood, "ood")
    return _average_precision(tp, fp)


def detection_accuracy(scores_id: ScoresLike, scores_ood: ScoresLike) -> Tensor:
    """Best balanced accuracy over thresholds: max_t 0.5 * (TPR(t) + TNR(t)), ID positive.

    The "detection accuracy" of ODIN (Liang et al., 2018) and Mahalanobis (Lee et al., 2018)
    code: ID and OOD weigh equally whatever the set sizes. The DICE/LINe code's DTERR instead
    weighs errors by sample count (min_t (FN + FP) / (N_ID + N_OOD)); that is not this metric.
    Symmetric in the choice of positive class.
    """
    tp, fp = roc_counts(scores_id, scores_ood, "id")
    return _detection_accuracy(tp, fp)


def ood_metric_tensors(scores_id: ScoresLike, scores_ood: ScoresLike) -> dict[str, Tensor]:
    """All of :data:`METRIC_NAMES` as 0-d float64 tensors (two sorts of the pooled scores)."""
    sid = _as_scores(scores_id, "scores_id", "ID")
    sood = _as_scores(scores_ood, "scores_ood", "OOD")
    tp, fp = _roc_counts(sid, sood)
    tp_out, fp_out = _roc_counts(-sood, -sid)
    return {
        "fpr95": _fpr_at_tpr_roc(sid, sood, 0.95),
        "fpr80": _fpr_at_tpr_roc(sid, sood, 0.80),
        "fpr95_oodpos": _fpr_at_tpr_roc(-sood, -sid, 0.95),
        "auroc": _auroc(tp, fp),
        "aupr_in": _average_precision(tp, fp),
        "aupr_out": _average_precision(tp_out, fp_out),
        "detection_acc": _detection_accuracy(tp, fp),
    }


def ood_metrics(scores_id: ScoresLike, scores_ood: ScoresLike) -> dict[str, float]:
    """All standard OOD metrics as fractions in [0, 1], keys :data:`METRIC_NAMES` in order.

    FPRs use the exact ROC method (see :func:`fpr_at_tpr`); multiply by 100 for tables and name
    the convention (:data:`METRIC_CONVENTIONS`) in the header.
    """
    return {k: float(v) for k, v in ood_metric_tensors(scores_id, scores_ood).items()}


# -- CCR@FPR (open-set classification) ---------------------------------------------------------
def ccr_name(fpr: float) -> str:
    """The results key of CCR at FPR ``fpr``, e.g. ``ccr_fpr1e-4``, ``ccr_fpr2.5e-2``."""
    mantissa, exponent = f"{_check_fpr(fpr):.15e}".split("e")
    return f"ccr_fpr{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr <= 1.0:
        raise ValueError(
            f"fpr must be in (0, 1] (a fraction of the OOD set, e.g. 1e-4 not 0.01 %), got {fpr}"
        )
    return fpr


#: The FPRs OpenOOD's ``ccr_fpr`` was reported at (its ``ccr_4`` ... ``ccr_1``), in table order.
CCR_FPRS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
#: Keys of :func:`ccr_metrics` at :data:`CCR_FPRS`: ``ccr_fpr1e-4`` ... ``ccr_fpr1e-1``.
CCR_NAMES: tuple[str, ...] = tuple(ccr_name(t) for t in CCR_FPRS)
#: One-line description of each key of :data:`CCR_NAMES`.
CCR_CONVENTIONS: dict[str, str] = {
    name: (
        f"CCR at FPR {t:g}: fraction of ALL ID samples that are accepted as ID and correctly "
        f"classified, at the lowest threshold accepting at most {t:g} of the OOD set"
    )
    for name, t in zip(CCR_NAMES, CCR_FPRS, strict=True)
}


def _as_correct(correct_id: ScoresLike, n_id: int, device: torch.device) -> Tensor:
    """Validate per-ID-sample correctness (bool or integer 0/1, shape (N_ID,)) as bool."""
    t = correct_id.detach() if isinstance(correct_id, Tensor) else torch.as_tensor(correct_id)
    if tuple(t.shape) != (n_id,):
        raise ValueError(
            f"correct_id must have one entry per ID score, shape ({n_id},), got "
            f"{tuple(t.shape)}; pass (predictions == labels) of the ID samples in score order"
        )
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex():
            raise TypeError(
                f"correct_id must be bool or integer 0/1 (predictions == labels), got dtype "
                f"{t.dtype}"
            )
        if bool(((t != 0) & (t != 1)).any()):
            raise ValueError(
                "correct_id must hold only 0/1 (or bool): whether each ID sample's predicted "
                "class equals its label, not the labels themselves"
            )
        t = t != 0
    return t.to(device)


def _ccr_thresholds(sood: Tensor, fprs: Sequence[float], method: CCRMethod) -> list[Tensor | None]:
    """Per FPR, the OOD score an ID sample must strictly exceed (None: accept every sample)."""
    n = sood.numel()
    desc = torch.sort(sood, descending=True).values
    if method == "roc":
        # k = max{k : k / N <= fpr}, compared in float64 as a ROC's fp / N is; for decimal
        # rates this is floor(fpr * N) exactly (0.29 * 100 is 28.999999999999996 in float64,
        # yet 29 / 100 == 0.29). The (k+1)-th largest OOD score, desc[k], is then refused.
        ratios = torch.arange(n + 1, dtype=torch.float64, device=sood.device) / n
        rates = torch.tensor(list(fprs), dtype=torch.float64, device=sood.device)
        ks = (torch.searchsorted(ratios, rates, right=True) - 1).tolist()
        return [None if k >= n else desc[k] for k in ks]
    if method == "openood":
        # fp_num = int(np.ceil(fpr * num_ood)); thresh = np.sort(ood_conf)[-fp_num], with the
        # product in float64 as OpenOOD computes it (0.07 * 100 -> 7.000000000000001 -> 8).
        return [desc[math.ceil(fpr * n) - 1] for fpr in fprs]
    raise ValueError(f"method must be 'roc' or 'openood', got {method!r}")


def _ccr(sid: Tensor, correct: Tensor, thresholds: Sequence[Tensor | None]) -> list[Tensor]:
    """#{correct ID samples above each threshold} / N_ID: integer counts, one division."""
    good = sid[correct]
    counts = [good.numel() if thr is None else int((good > thr).sum()) for thr in thresholds]
    return [torch.tensor(c / sid.numel(), dtype=torch.float64, device=sid.device) for c in counts]


def ccr_at_fpr(
    scores_id: ScoresLike,
    scores_ood: ScoresLike,
    correct_id: ScoresLike,
    fpr: float = 1e-4,
    *,
    method: CCRMethod = "roc",
) -> Tensor:
    """Correct classification rate at a false-positive rate: open-set accuracy (Dhamija et al.,
    2018, the OSCR curve; OpenOOD's ``ccr_fpr``).

    CCR(thr) = #{ID samples with score accepted by thr AND prediction == label} / N_ID (all
    ID samples in the denominator, so a rejected or misclassified ID sample both count as
    failures) and FPR(thr) = #{OOD samples accepted} / N_OOD: the **OOD set is the negative
    side**, an OOD sample accepted as ID is the false positive (the project's ID-positive
    convention, as ``fpr95``). Higher score = more ID, as everywhere here.

    Methods (``k`` is the number of OOD samples the threshold may accept):
        ``"roc"`` (default): the exact OSCR-curve reading, the **best CCR over all
        thresholds whose FPR is <= fpr**. With ``k = max{k : k / N_OOD <= fpr}`` (float64,
        = floor(fpr * N_OOD) for decimal rates) and ``o_(k+1)`` the (k+1)-th largest OOD score,
        an ID sample is accepted iff ``score > o_(k+1)`` (every ID sample when k = N_OOD).
        Ties: scores equal to ``o_(k+1)`` are refused, ID and OOD alike, because no threshold
        can accept an ID sample without the OOD samples of the same score (tied scores form
        one threshold group, as in :func:`fpr_at_tpr`). The achieved FPR never exceeds fpr.

        ``"openood"``: OpenOOD v1.5 ``openood/evaluators/metrics.py::ccr_fpr`` literally:
        ``fp_num = ceil(fpr * N_OOD)`` (the float64 product: ``0.07 * 100`` gives 8),
        ``thr = o_(fp_num)``, accept iff ``score > thr`` (strict; equal scores refused).

    Relation: ``fp_num`` is ``k + 1`` (same threshold, same value) except when ``fpr * N_OOD``
    is a whole number in float64 (e.g. 1e-4 x 10,000); then ``fp_num = k``, OpenOOD's
    threshold is the next OOD score up, it accepts at most ``k - 1`` OOD samples (FPR strictly
    below ``fpr``) and its CCR is <= the ``"roc"`` one by
    ``#{correct ID with o_(k+1) < score <= o_(k)} / N_ID``.

    Args:
        scores_id: (N_ID,) ID scores.
        scores_ood: (N_OOD,) OOD scores.
        correct_id: (N_ID,) bool or 0/1: ``prediction == label`` of each ID sample, in the
            order of ``scores_id``.
        fpr: the FPR budget in (0, 1], a fraction (OpenOOD reports 1e-4 ... 1e-1).
        method: ``"roc"`` or ``"openood"`` (above).

    Returns:
        0-d float64 tensor in [0, accuracy]: an integer count over N_ID, one rounding.
    """
    return ccr_metric_tensors(scores_id, scores_ood, correct_id, (fpr,), method=method)[
        ccr_name(fpr)
    ]


def ccr_metric_tensors(
    scores_id: ScoresLike,
    scores_ood: ScoresLike,
    correct_id: ScoresLike,
    fprs: Sequence[float] = CCR_FPRS,
    *,
    method: CCRMethod = "roc",
) -> dict[str, Tensor]:
    """:func:`ccr_at_fpr` at every rate of ``fprs`` (one sort of the OOD scores), keyed by
    :func:`ccr_name` (:data:`CCR_NAMES` for the default rates), 0-d float64 tensors."""
    sid = _as_scores(scores_id, "scores_id", "ID")
    sood = _as_scores(scores_ood, "scores_ood", "OOD")
    correct = _as_correct(correct_id, sid.numel(), sid.device)
    rates = [_check_fpr(t) for t in fprs]
    names = [ccr_name(t) for t in rates]
    if len(set(names)) != len(names):
        raise ValueError(f"fprs must be distinct rates, got {list(fprs)}")
    values = _ccr(sid, correct, _ccr_thresholds(sood.to(sid.device), rates, method))
    return dict(zip(names, values, strict=True))


def ccr_metrics(
    scores_id: ScoresLike,
    scores_ood: ScoresLike,
    correct_id: ScoresLike,
    fprs: Sequence[float] = CCR_FPRS,
    *,
    method: CCRMethod = "roc",
) -> dict[str, float]:
    """:func:`ccr_metric_tensors` as floats: fractions in [0, 1], keys :data:`CCR_NAMES` for
    the default rates (multiply by 100 for tables, naming :data:`CCR_CONVENTIONS`)."""
    out = ccr_metric_tensors(scores_id, scores_ood, correct_id, fprs, method=method)
    return {k: float(v) for k, v in out.items()}
