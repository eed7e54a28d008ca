"""CCR@FPR: hand-computed toys, ties, brute force and OpenOOD's formula on random toys, errors.

Every case of the reference harness (``test_reference_harness.py``) also checks both methods
against brute force and OpenOOD's formula, and the ``Metric`` classes in batches, merged and
under real 2-rank DDP; this file keeps the cases worked out by hand and the properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_reference_harness import _openood_ccr_fpr

from lightning_ood.metrics import (
    CCR_CONVENTIONS,
    CCR_FPRS,
    CCR_NAMES,
    CCRAtFPR,
    CCRMetrics,
    ccr_at_fpr,
    ccr_metrics,
    ccr_name,
)

# ID [0.9 c, 0.8 w, 0.7 c, 0.6 c, 0.5 w] (c: correctly classified, w: wrong), OOD
# [0.75, 0.6, 0.3, 0.2] (N_OOD = 4). Descending, pooled:
#   0.9 I c | 0.8 I w | 0.75 O | 0.7 I c | 0.6 I c = 0.6 O | 0.5 I w | 0.3 O | 0.2 O
SID = [0.9, 0.8, 0.7, 0.6, 0.5]
CORRECT = [True, False, True, True, False]
SOOD = [0.75, 0.6, 0.3, 0.2]


def brute_force_ccr(sid: np.ndarray, sood: np.ndarray, correct: np.ndarray, t: float) -> float:
    """Best #{correct ID with s >= thr} / N_ID over every threshold whose FPR <= t."""
    best = 0.0
    for thr in [*np.unique(np.r_[sid, sood]), np.inf]:
        if np.mean(sood >= thr) <= t:
            best = max(best, np.sum((sid >= thr) & correct) / len(sid))
    return best


# -- by hand -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fpr", "roc", "openood"),
    [
        # k = floor(0.4) = 0: refuse o_(1) = 0.75 -> accept 0.9 c, 0.8 w -> 1/5. OpenOOD
        # fp_num = ceil(0.4) = 1: the same threshold.
        (0.1, 0.2, 0.2),
        # k = 1: refuse o_(2) = 0.6 -> 0.9 c, 0.8 w, 0.7 c -> 2/5; the correct ID 0.6 ties
        # the OOD 0.6 and is refused with it. OpenOOD: 0.25 * 4 = 1 exactly, fp_num = 1,
        # threshold 0.75 (it admits no OOD sample) -> 1/5.
        (0.25, 0.4, 0.2),
        # k = 2: refuse o_(3) = 0.3 -> every ID, 3 correct -> 3/5. OpenOOD fp_num = 2 -> 0.6.
        (0.5, 0.6, 0.4),
        # k = floor(2.4) = 2 and fp_num = ceil(2.4) = 3: one threshold, 0.3.
        (0.6, 0.6, 0.6),
        # k = N: accept everything -> accuracy 3/5; OpenOOD: fp_num = 4, ID > 0.2 -> 3/5.
        (1.0, 0.6, 0.6),
    ],
)
def test_toy_case_by_hand(fpr: float, roc: float, openood: float) -> None:
    assert float(ccr_at_fpr(SID, SOOD, CORRECT, fpr)) == roc
    assert float(ccr_at_fpr(SID, SOOD, CORRECT, fpr, method="openood")) == openood
    assert brute_force_ccr(np.array(SID), np.array(SOOD), np.array(CORRECT), fpr) == roc
    conf = np.r_[SID, SOOD]
    label = np.r_[np.zeros(5, dtype=int), -np.ones(4, dtype=int)]
    pred = np.r_[np.where(CORRECT, 0, 1), -np.ones(4, dtype=int)]
    assert _openood_ccr_fpr(conf, fpr, pred, label) == openood


def test_all_rates_at_once_and_names() -> None:
    assert CCR_FPRS == (1e-4, 1e-3, 1e-2, 1e-1)
    assert CCR_NAMES == ("ccr_fpr1e-4", "ccr_fpr1e-3", "ccr_fpr1e-2", "ccr_fpr1e-1")
    assert set(CCR_CONVENTIONS) == set(CCR_NAMES)
    assert ccr_name(0.025) == "ccr_fpr2.5e-2" and ccr_name(1.0) == "ccr_fpr1e0"
    got = ccr_metrics(SID, SOOD, CORRECT, (0.1, 0.25, 0.5, 0.6, 1.0))
    assert got == {
        "ccr_fpr1e-1": 0.2,
        "ccr_fpr2.5e-1": 0.4,
        "ccr_fpr5e-1": 0.6,
        "ccr_fpr6e-1": 0.6,
        "ccr_fpr1e0": 0.6,
    }
    # The default rates: N_OOD = 4 gives k = 0 at each, the same as t = 0.1.
    assert ccr_metrics(SID, SOOD, CORRECT) == dict.fromkeys(CCR_NAMES, 0.2)


def test_all_equal_scores_refuse_everything_below_fpr_one() -> None:
    # A detector that cannot separate anything: any threshold accepting an ID sample accepts
    # every OOD sample (FPR 1). So CCR is 0 below FPR 1 and the accuracy at FPR 1; OpenOOD's
    # strict ">" against the lowest OOD score accepts nothing even at 1.
    sid, sood, correct = torch.full((8,), 2.5), torch.full((5,), 2.5), torch.arange(8) < 6
    for t in (*CCR_FPRS, 0.99):
        assert float(ccr_at_fpr(sid, sood, correct, t)) == 0.0
        assert float(ccr_at_fpr(sid, sood, correct, t, method="openood")) == 0.0
    assert float(ccr_at_fpr(sid, sood, correct, 1.0)) == 0.75
    assert float(ccr_at_fpr(sid, sood, correct, 1.0, method="openood")) == 0.0


def test_whole_number_budget_where_openood_admits_one_fewer() -> None:
    # 10,000 OOD scores 0..9999, t = 1e-4: one OOD sample may be accepted (k = 1, 1e-4 *
    # 10,000 == 1.0 in float64). The exact reading refuses o_(2) = 9998 and accepts the ID
    # sample at 9998.5; OpenOOD's fp_num = ceil(1.0) = 1 refuses o_(1) = 9999 as well.
    sood = torch.arange(10_000, dtype=torch.float64)
    sid = torch.tensor([9998.5, 20_000.0, 5.0])
    correct = torch.tensor([True, True, True])
    assert float(ccr_at_fpr(sid, sood, correct, 1e-4)) == 2 / 3
    assert float(ccr_at_fpr(sid, sood, correct, 1e-4, method="openood")) == 1 / 3
    # 100 OOD scores, t = 0.07: 0.07 * 100 is 7.000000000000001 in float64, so OpenOOD's ceil
    # gives 8 = k + 1 and both refuse o_(8) = 92: the same value. (At 1e-4 ... 1e-1 the
    # product is exact for every N_OOD up to 100,000.)
    assert math.ceil(0.07 * 100) == 8
    for d, t in zip((4, 3, 2, 1), CCR_FPRS, strict=True):  # t = 10^-d: exact ceil -(-n // 10^d)
        assert all(math.ceil(t * n) == -(-n // 10**d) for n in range(1, 10**5 + 1)), t
    sood100 = torch.arange(100, dtype=torch.float64)
    sid100 = torch.tensor([92.5, 91.0])
    both = torch.tensor([True, True])
    assert float(ccr_at_fpr(sid100, sood100, both, 0.07)) == 0.5
    assert float(ccr_at_fpr(sid100, sood100, both, 0.07, method="openood")) == 0.5


def test_accuracy_at_fpr_one_and_misclassified_never_count() -> None:
    rng = np.random.default_rng(5)
    sid, sood = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    correct = rng.random(300) < 0.8
    assert float(ccr_at_fpr(sid, sood, correct, 1.0)) == np.mean(correct)
    none_right = np.zeros(300, dtype=bool)
    assert ccr_metrics(sid, sood, none_right) == dict.fromkeys(CCR_NAMES, 0.0)


# -- random toys: brute force, OpenOOD's formula, the relation between them --------------------
@pytest.mark.parametrize("ties", [False, True])
def test_random_toys_against_brute_force_and_openood(ties: bool) -> None:
    rng = np.random.default_rng(17 + ties)
    rates = (*CCR_FPRS, 0.05, 0.2, 0.25, 0.29, 1 / 3, 0.5, 0.9, 1.0)
    for trial in range(150):
        n_id, n_ood = int(rng.integers(1, 40)), int(rng.integers(1, 60))
        sid, sood = rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
        if ties:
            sid, sood = np.round(sid * 2) / 2, np.round(sood * 2) / 2
        correct = rng.random(n_id) < 0.7
        conf = np.r_[sid, sood]
        label = np.r_[rng.integers(0, 10, n_id), -np.ones(n_ood, dtype=int)]
        pred = label.copy()
        pred[:n_id][~correct] = (label[:n_id][~correct] + 1) % 10
        roc = ccr_metrics(sid, sood, correct, rates)
        openood = ccr_metrics(sid, sood, correct, rates, method="openood")
        desc = np.sort(sood)[::-1]
        for t in rates:
            key = ccr_name(t)
            where = f"trial {trial}, N_ID {n_id}, N_OOD {n_ood}, t {t}"
            assert roc[key] == brute_force_ccr(sid, sood, correct, t), where
            assert openood[key] == _openood_ccr_fpr(conf, t, pred, label), where
            # OpenOOD's fp_num is k + 1 (same threshold) or k (t * N whole): then it refuses
            # one more OOD rank and loses the correct ID samples between the two thresholds.
            k = max(j for j in range(n_ood + 1) if j / n_ood <= t)
            fp_num = math.ceil(t * n_ood)
            assert fp_num in (k, k + 1), where
            if fp_num == k + 1:
                assert openood[key] == roc[key], where
            else:
                between = (
                    (sid > desc[k]) & (sid <= desc[k - 1]) & correct
                    if k < n_ood
                    else ((sid <= desc[k - 1]) & correct)
                )
                assert roc[key] - openood[key] == pytest.approx(np.sum(between) / n_id), where


def test_float32_scores_widen_exactly_and_ranking_invariance() -> None:
    rng = np.random.default_rng(3)
    sid = torch.tensor(rng.uniform(30, 40, 400), dtype=torch.float32)
    sood = torch.tensor(rng.uniform(20, 32, 300), dtype=torch.float32)
    correct = torch.tensor(rng.random(400) < 0.9)
    got = ccr_metrics(sid, sood, correct)
    assert got == ccr_metrics(sid.double().numpy(), sood.double().numpy(), correct)
    # A strictly increasing map of the scores changes no threshold decision.
    assert ccr_metrics(sid.double() * 1e3 - 5e4, sood.double() * 1e3 - 5e4, correct) == got


# -- errors --------------------------------------------------------------------------------------
def test_functional_input_errors() -> None:
    with pytest.raises(ValueError, match=r"correct_id must have one entry per ID score.*\(5,\)"):
        ccr_at_fpr(SID, SOOD, [True, False])
    with pytest.raises(TypeError, match="correct_id must be bool or integer 0/1"):
        ccr_at_fpr(SID, SOOD, [1.0, 0.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="not the labels themselves"):
        ccr_at_fpr(SID, SOOD, [3, 0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\].*got 10"):
        ccr_at_fpr(SID, SOOD, CORRECT, 10)
    with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\]"):
        ccr_at_fpr(SID, SOOD, CORRECT, 0.0)
    with pytest.raises(ValueError, match="method must be 'roc' or 'openood'"):
        ccr_at_fpr(SID, SOOD, CORRECT, method="reference")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct rates"):
        ccr_metrics(SID, SOOD, CORRECT, (0.1, 0.1))
    with pytest.raises(ValueError, match=r"scores_ood is empty: the OOD set"):
        ccr_at_fpr(SID, [], CORRECT)
    with pytest.raises(ValueError, match=r"scores_id \(ID set\) contains 1 NaN"):
        ccr_at_fpr([float("nan"), 1.0], SOOD, [True, True])
    # int 0/1 and bool are the same correctness
    assert ccr_metrics(SID, SOOD, [1, 0, 1, 1, 0]) == ccr_metrics(SID, SOOD, CORRECT)


def test_metric_class_input_errors_and_reset() -> None:
    metric = CCRAtFPR(0.5)
    with pytest.raises(ValueError, match=r"CCR needs `correct`.*3 ID samples"):
        metric.update(torch.ones(3), True)
    with pytest.raises(ValueError, match=r"correct must have the same shape as scores \(3,\)"):
        metric.update(torch.ones(3), True, torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="correct must be bool or integer"):
        metric.update(torch.ones(3), True, torch.ones(3))
    with pytest.raises(ValueError, match="not class labels"):
        metric.update(torch.ones(3), True, torch.tensor([0, 7, 1]))
    with pytest.raises(TypeError, match=r"scores must be a torch\.Tensor"):
        metric.update([1.0], True, torch.ones(1, dtype=torch.bool))  # type: ignore[arg-type]
    assert metric.scores == [] and metric.correct == []  # a refused batch leaves no state
    with pytest.raises(ValueError, match="called before update"):
        metric.compute()
    metric.update(torch.tensor(SID), True, torch.tensor(CORRECT))
    metric.update(torch.tensor(SOOD), False)  # OOD samples need no correctness
    assert float(metric.compute()) == 0.6
    metric.reset()
    assert metric.correct == []
    with pytest.raises(ValueError, match=r"fpr must be in \(0, 1\]"):
        CCRAtFPR(fpr=5)
    with pytest.raises(ValueError, match="one or more distinct rates"):
        CCRMetrics(fprs=())
    with pytest.raises(ValueError, match="method must be"):
        CCRMetrics(method="sklearn")  # type: ignore[arg-type]


def test_ood_correctness_is_ignored() -> None:
    # Whatever is passed as "correct" for OOD samples (they have no label) changes nothing.
    metric_a, metric_b = CCRMetrics((0.25, 0.5)), CCRMetrics((0.25, 0.5))
    scores = torch.tensor([*SID, *SOOD])
    is_id = torch.tensor([True] * 5 + [False] * 4)
    metric_a.update(scores, is_id, torch.tensor([*CORRECT, True, True, True, True]))
    metric_b.update(scores, is_id, torch.tensor([*CORRECT, False, False, False, False]))
    want = {"ccr_fpr2.5e-1": 0.4, "ccr_fpr5e-1": 0.6}
    assert {k: float(v) for k, v in metric_a.compute().items()} == want
    assert {k: float(v) for k, v in metric_b.compute().items()} == want
