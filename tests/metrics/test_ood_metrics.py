"""OOD metrics: hand-computed cases, the DICE/LINe reference formula, properties, bad input.

Every metric against scikit-learn, the Metric classes in batches, merged and under real DDP,
on shared seeded arrays, is in ``test_reference_harness.py``; this file keeps what it does not
assert.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve as roc_curve_sk
from test_reference_harness import sklearn_values

from lightning_ood.metrics import (
    METRIC_CONVENTIONS,
    METRIC_NAMES,
    FPRAtTPR,
    OODMetrics,
    aupr_in,
    aupr_out,
    auroc,
    detection_accuracy,
    fpr_at_tpr,
    ood_metrics,
    roc_counts,
)

TOL = 1e-12


# -- references on the same numbers --------------------------------------------------------
def reference_fpr95(known: np.ndarray, novel: np.ndarray) -> float:
    """The DICE/LINe ``util/metrics.py`` formula, written out with numpy, literal 0.05."""
    known = np.sort(known)
    threshold = known[round(0.05 * known.shape[0])]
    return np.sum(novel > threshold) / float(novel.shape[0])


def random_scores(
    seed: int, n_id: int, n_ood: int, ties: bool, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sid = rng.normal(1.0, 1.0, n_id) * scale
    sood = rng.normal(0.0, 1.2, n_ood) * scale
    if ties:  # coarse grid: many ID/ID, OOD/OOD and ID/OOD ties
        sid, sood = np.round(sid, 1), np.round(sood, 1)
    return sid, sood


# -- hand-computed toy cases ---------------------------------------------------------------
def test_toy_case_by_hand() -> None:
    # ID [0.9, 0.8, 0.7, 0.6] (P = 4), OOD [0.65, 0.1] (N = 2). Descending with labels:
    #   0.9 I, 0.8 I, 0.7 I, 0.65 O, 0.6 I, 0.1 O
    # ROC counts (TP, FP): (0,0) (1,0) (2,0) (3,0) (3,1) (4,1) (4,2).
    # fpr95: smallest k with k/4 >= 0.95 is 4 -> thr 0.6 -> OOD >= 0.6 is {0.65} -> 1/2.
    # fpr80: k/4 >= 0.8 also needs k = 4 (3/4 < 0.8) -> 1/2.
    # fpr95_oodpos: catching 95 % of 2 OOD needs both -> accept OOD if score <= 0.65 ->
    #   ID flagged: {0.6} -> 1/4.
    # auroc: ID > OOD pairs: 0.9, 0.8, 0.7 beat both (6), 0.6 beats 0.1 (1) -> 7/8.
    # aupr_in: recall steps of 1/4 at precisions 1/1, 2/2, 3/3, 4/5 -> (3 + 0.8)/4 = 0.95.
    # aupr_out (OOD positive, ascending score): 0.1 O -> P 1, R 1/2; 0.6 I; 0.65 O -> P 2/3,
    #   R 1 -> 1/2 * 1 + 1/2 * 2/3 = 5/6.
    # detection_acc: best at (TP, FP) = (3, 0): 0.5 * (3/4 + 1) = 0.875.
    sid, sood = [0.9, 0.8, 0.7, 0.6], [0.65, 0.1]
    want = {
        "fpr95": 0.5,
        "fpr80": 0.5,
        "fpr95_oodpos": 0.25,
        "auroc": 0.875,
        "aupr_in": 0.95,
        "aupr_out": 5 / 6,
        "detection_acc": 0.875,
    }
    got = ood_metrics(sid, sood)
    assert list(got) == list(METRIC_NAMES)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=TOL), k
    tp, fp = roc_counts(sid, sood)
    assert tp.tolist() == [0, 1, 2, 3, 3, 4, 4]
    assert fp.tolist() == [0, 0, 0, 0, 1, 1, 2]
    # Reference formula: fpr95 index round(0.05 * 4) = 0 -> thr 0.6 -> OOD > 0.6 -> 1/2;
    # fpr80 index round(0.2 * 4) = 1 -> thr 0.7 -> OOD > 0.7 -> 0 (it keeps only 3/4 < 80 %).
    assert float(fpr_at_tpr(sid, sood, 0.95, method="reference")) == 0.5
    assert float(fpr_at_tpr(sid, sood, 0.80, method="reference")) == 0.0


def test_toy_case_with_ties() -> None:
    # ID [1, 1, 1, 1], OOD [1, 0]: saturated scores as MSP gives. Exact ROC: the only threshold
    # keeping >= 95 % of ID is 1 and it also accepts OOD 1 -> 1/2. Reference: thr = 1 and the
    # strict OOD > 1 accepts nothing -> 0. AUROC: each ID ties OOD 1 (1/2) and beats OOD 0 (1):
    # 4 * 1.5 / 8 = 0.75. Detection acc: (TP, FP) points (0,0) (4,1) (4,2) -> max 0.5*(1+0.5).
    sid, sood = [1.0, 1.0, 1.0, 1.0], [1.0, 0.0]
    assert float(fpr_at_tpr(sid, sood)) == 0.5
    assert float(fpr_at_tpr(sid, sood, method="reference")) == 0.0
    assert float(auroc(sid, sood)) == 0.75
    assert float(detection_accuracy(sid, sood)) == 0.75
    # AUPR-In: one group {1,1,1,1,1} with precision 4/5, recall 1 -> 0.8.
    assert float(aupr_in(sid, sood)) == pytest.approx(0.8, abs=TOL)
    # AUPR-Out: ascending 0 (O) -> P 1, R 1/2; then the tie group -> P 2/6, R 1 -> 1/2 + 1/6.
    assert float(aupr_out(sid, sood)) == pytest.approx(2 / 3, abs=TOL)


def test_perfect_and_inverted_separation() -> None:
    sid, sood = np.arange(10.0, 20.0), np.arange(0.0, 5.0)
    m = ood_metrics(sid, sood)
    assert m == {
        "fpr95": 0.0,
        "fpr80": 0.0,
        "fpr95_oodpos": 0.0,
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
        "detection_acc": 1.0,
    }
    inv = ood_metrics(sood, sid)  # every OOD above every ID
    assert inv["fpr95"] == 1.0 and inv["fpr95_oodpos"] == 1.0 and inv["auroc"] == 0.0
    assert inv["detection_acc"] == 0.5


# -- scikit-learn on the same arrays (every metric and case: test_reference_harness.py) ----
@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0, 0.001])
def test_fpr_at_any_tpr_matches_sklearn(tpr: float) -> None:
    sid, sood = random_scores(7, 333, 444, ties=True)
    y = np.r_[np.ones(len(sid)), np.zeros(len(sood))]
    fpr, tpr_curve, _ = roc_curve_sk(y, np.r_[sid, sood], drop_intermediate=False)
    assert float(fpr_at_tpr(sid, sood, tpr)) == pytest.approx(
        fpr[np.argmax(tpr_curve >= tpr)], abs=TOL
    )


def test_raw_scores_no_sigmoid_no_binning() -> None:
    # Energies far outside [0, 1] (float32): torchmetrics would squash these through a sigmoid,
    # where every value above ~17 rounds to exactly 1.0 in float32 and all pairs tie.
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(11)
    sid = torch.tensor(rng.uniform(30.0, 40.0, 500), dtype=torch.float32)
    sood = torch.tensor(rng.uniform(20.0, 32.0, 500), dtype=torch.float32)
    got = ood_metrics(sid, sood)
    assert got["auroc"] > 0.95
    tm = float(
        binary_auroc(torch.cat([sid, sood]), torch.cat([torch.ones(500), torch.zeros(500)]).int())
    )
    assert abs(tm - got["auroc"]) > 0.3  # the sigmoid collapse this module exists to avoid
    # Ranking metrics are invariant to a strictly increasing map of the scores.
    shifted = ood_metrics(sid.double() * 1e3 - 5e4, sood.double() * 1e3 - 5e4)
    for k in METRIC_NAMES:
        assert shifted[k] == pytest.approx(got[k], abs=TOL), k


def test_symmetries() -> None:
    sid, sood = random_scores(9, 500, 700, ties=True)
    assert float(auroc(sid, sood)) + float(auroc(sood, sid)) == pytest.approx(1.0, abs=TOL)
    # AUPR-Out is AUPR-In with the roles swapped and the scores negated.
    assert float(aupr_out(sid, sood)) == pytest.approx(float(aupr_in(-sood, -sid)), abs=TOL)
    assert float(fpr_at_tpr(sid, sood, positive="ood")) == float(fpr_at_tpr(-sood, -sid))
    # float32 input is widened exactly: same numbers as float64 of the same values.
    s32 = torch.tensor(sid, dtype=torch.float32)
    assert ood_metrics(s32, sood) == ood_metrics(s32.double().numpy(), sood)


def test_large_input_is_fast_and_exact() -> None:
    sid, sood = random_scores(13, 200_000, 150_000, ties=True, scale=10.0)
    start = time.perf_counter()
    got = ood_metrics(torch.from_numpy(sid), torch.from_numpy(sood))
    elapsed = time.perf_counter() - start
    want = sklearn_values(sid, sood)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], abs=TOL), k
    assert elapsed < 5.0, f"ood_metrics on 350k scores took {elapsed:.2f} s"


# -- the reference FPR95 formula -------------------------------------------------------------
@pytest.mark.parametrize("n_id", [1, 2, 10, 19, 20, 30, 50, 99, 101, 1000, 10000])
def test_reference_fpr95_matches_numpy_formula(n_id: int) -> None:
    # n_id = 10 and 30 hit round-half cases (0.05 * 10 = 0.5 -> 0 with round-half-even).
    sid, sood = random_scores(n_id, n_id, 257, ties=True)
    got = float(fpr_at_tpr(sid, sood, 0.95, method="reference"))
    assert got == reference_fpr95(sid, sood)


def test_reference_fpr80_matches_numpy_formula() -> None:
    for n_id in (5, 12, 33, 1000):
        sid, sood = random_scores(n_id, n_id, 100, ties=True)
        known = np.sort(sid)
        thr = known[round(0.2 * n_id)]
        want = np.sum(sood > thr) / len(sood)
        assert float(fpr_at_tpr(sid, sood, 0.80, method="reference")) == want


@pytest.mark.parametrize("tpr", [0.95, 0.8])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_minus_reference_is_the_band_between_thresholds(tpr: float, ties: bool) -> None:
    # FPR_exact - FPR_reference = mean(thr_exact <= OOD <= thr_reference), with thr_exact the
    # sklearn ROC threshold and thr_reference the sorted-ID entry at round((1 - tpr) * N).
    alpha = round(1 - tpr, 12)
    for n_id in range(1, 121):
        sid, sood = random_scores(1000 + n_id, n_id, 200, ties)
        y = np.r_[np.ones(n_id), np.zeros(len(sood))]
        fpr, tpr_curve, thr = roc_curve_sk(y, np.r_[sid, sood], drop_intermediate=False)
        i = np.argmax(tpr_curve >= tpr)
        thr_exact = thr[i]
        thr_ref = np.sort(sid)[min(round(alpha * n_id), n_id - 1)]
        assert thr_ref >= thr_exact
        exact = float(fpr_at_tpr(sid, sood, tpr))
        ref = float(fpr_at_tpr(sid, sood, tpr, method="reference"))
        assert exact == pytest.approx(fpr[i], abs=TOL)
        band = np.mean((sood >= thr_exact) & (sood <= thr_ref))
        assert exact - ref == pytest.approx(band, abs=TOL), n_id
        if not ties and (alpha * n_id) % 1 < 0.5 - 1e-9:
            assert exact == ref, n_id  # same threshold, no OOD exactly on it


# -- bad input -------------------------------------------------------------------------------
def test_empty_sets_are_named() -> None:
    with pytest.raises(ValueError, match=r"scores_id is empty.*ID set"):
        ood_metrics([], [0.1])
    with pytest.raises(ValueError, match=r"scores_ood is empty.*OOD set"):
        auroc([0.1], torch.empty(0))


def test_non_finite_scores_are_counted_per_set() -> None:
    sood = torch.tensor([0.1, float("nan"), float("inf"), float("nan"), -float("inf")])
    with pytest.raises(ValueError, match=r"scores_ood \(OOD set\) contains 2 NaN and 2 Inf"):
        ood_metrics(torch.ones(3), sood)
    with pytest.raises(ValueError, match=r"scores_id \(ID set\) contains 1 NaN and 0 Inf"):
        fpr_at_tpr(torch.tensor([1.0, float("nan")]), torch.zeros(2))


def test_bad_shapes_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"scores_id must be 1-D.*\(4, 2\)"):
        ood_metrics(torch.ones(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match=r"scores_ood must be 1-D.*\(\)"):
        ood_metrics(torch.ones(4), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"tpr must be in \(0, 1\].*95"):
        fpr_at_tpr([1.0], [0.0], tpr=95)
    with pytest.raises(ValueError, match="method must be"):
        fpr_at_tpr([1.0], [0.0], method="openood")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive must be"):
        fpr_at_tpr([1.0], [0.0], positive="in")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="real numbers"):
        auroc(torch.ones(2, dtype=torch.complex64), torch.ones(2))


# -- torchmetrics classes (values: test_reference_harness.py) -------------------------------
def test_reset_starts_over() -> None:
    sid, sood = random_scores(21, 90, 130, ties=True)
    metric = OODMetrics()
    metric.update(torch.from_numpy(sid), True)
    metric.update(torch.from_numpy(sood), False)
    metric.compute()
    metric.reset()
    assert metric.scores == [] and metric.is_id == []
    metric.update(torch.tensor([0.9, 0.8, 0.7, 0.6]), True)
    metric.update(torch.tensor([0.65, 0.1]), False)
    assert float(metric.compute()["aupr_out"]) == pytest.approx(5 / 6, abs=TOL)


def test_float32_scores_are_stored_as_float64() -> None:
    metric = OODMetrics()
    metric.update(torch.tensor([1.0, 2.0], dtype=torch.float32), True)
    assert metric.scores[0].dtype == torch.float64
    assert metric.is_id[0].dtype == torch.bool


def test_metric_input_errors() -> None:
    metric = OODMetrics()
    with pytest.raises(ValueError, match=r"is_id must have the same shape as scores \(3,\)"):
        metric.update(torch.ones(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="is_id must be bool or integer"):
        metric.update(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="only 0 \\(OOD\\) and 1 \\(ID\\)"):
        metric.update(torch.ones(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"scores must be 1-D.*\(2, 2\)"):
        metric.update(torch.ones(2, 2), True)
    with pytest.raises(ValueError, match="called before update"):
        metric.compute()
    metric.update(torch.tensor([1.0, float("nan")]), True)
    metric.update(torch.tensor([0.0, float("inf"), 2.0]), False)
    with pytest.raises(ValueError, match=r"scores_id \(ID set\) contains 1 NaN and 0 Inf"):
        metric.compute()
    only_id = OODMetrics()
    only_id.update(torch.ones(4), True)
    with pytest.raises(ValueError, match="scores_ood is empty: the OOD set"):
        only_id.compute()
    with pytest.raises(ValueError, match="tpr must be in"):
        FPRAtTPR(tpr=95)


def test_conventions_documented() -> None:
    assert METRIC_NAMES == (
        "fpr95",
        "fpr80",
        "fpr95_oodpos",
        "auroc",
        "aupr_in",
        "aupr_out",
        "detection_acc",
    )
    assert set(METRIC_CONVENTIONS) == set(METRIC_NAMES)
    assert "ID positive" in METRIC_CONVENTIONS["fpr95"]
    assert "OOD positive" in METRIC_CONVENTIONS["fpr95_oodpos"]
