"""Reference harness: every OOD metric, every way it is computed, on the same seeded arrays.

The idea of torchmetrics' ``tests/unittests/_helpers/testers.py``, written for this package.
For each case in :data:`CASES` (continuous, heavy ties, all-equal, 1-3 samples per side, 10:1
and 1:10 sets, energies of magnitude 50-200, gaps below float32 resolution; each in float64 and
float32) and each mode:

- ``sklearn``: every functional value against scikit-learn on the same numbers (to
  :data:`SKLEARN_TOL`); the fused :func:`ood_metric_tensors` against the single-metric
  functions and :func:`roc_counts`/:func:`roc_curve` against sklearn's curve, exactly.
- ``class``: every ``Metric`` class in :data:`CLASS_SPECS` fed in several batches (ID and OOD
  interleaved, all three label forms) equals the functional value exactly.
- ``merged``: two instances fed disjoint, uneven parts and joined with ``merge_state``.
- ``ddp``: the same parts on two real ``gloo`` ranks on CPU; ``compute()`` gathers them. All
  cases run in one process group (:func:`ddp_results`) because starting ranks costs seconds.

CCR@FPR also needs each ID sample's correctness: every case carries a seeded ``correct`` array
(about 70 % True) and the OOD samples a random one the metrics must ignore. Its "sklearn" mode
compares with :func:`ccr_reference_values`: the best CCR over every threshold with FPR <= t
found by brute force (``"roc"``), and OpenOOD v1.5's ``ccr_fpr`` formula written out with
numpy (``"openood"``).

sklearn conventions (ID is label 1; scores higher = more ID):

- ``auroc`` = ``roc_auc_score(y, s)``; ``aupr_in`` = ``average_precision_score(y, s)``;
  ``aupr_out`` = ``average_precision_score(1 - y, -s)``.
- ``fpr95``/``fpr80`` = ``fpr[np.argmax(tpr >= t)]`` with ``fpr, tpr`` from ``roc_curve(y, s,
  drop_intermediate=False)``: the first ROC point, highest threshold down, whose TPR reaches
  ``t``; no interpolation between points. ``fpr95_oodpos``: the same on ``(1 - y, -s)``.
- ``fpr95_reference``/``fpr80_reference`` (``method="reference"``, the LINe/DICE code): the
  threshold is the ID score at ascending rank ``round((1 - t) * N_ID)`` and OOD counts when
  strictly above it, i.e. ``fpr[i - 1]`` where ``thresholds[i]`` is that score (the ROC point
  one distinct threshold higher).
- ``detection_acc`` = ``max(0.5 * (tpr + 1 - fpr))`` over the same ``roc_curve`` points.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as roc_curve_sk
from torch import Tensor
from torchmetrics import Metric

from lightning_ood.metrics import (
    AUPR,
    CCR_FPRS,
    METRIC_NAMES,
    OODAUROC,
    CCRAtFPR,
    CCRMetrics,
    DetectionAccuracy,
    FPRAtTPR,
    OODMetrics,
    OODScoreMetric,
    aupr_in,
    aupr_out,
    auroc,
    ccr_at_fpr,
    ccr_metric_tensors,
    ccr_name,
    detection_accuracy,
    fpr_at_tpr,
    modular,
    ood_metric_tensors,
    roc_counts,
    roc_curve,
)

SKLEARN_TOL = 1e-12
WORLD_SIZE = 2

Labels = Tensor | bool


# -- the arrays ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One pair of score arrays; ``sid``/``sood`` hold values exactly representable in dtype;
    ``correct`` says which ID samples the classifier got right (for CCR)."""

    name: str
    sid: np.ndarray
    sood: np.ndarray
    dtype: torch.dtype
    seed: int
    correct: np.ndarray

    def tensors(self) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.sid, dtype=self.dtype), torch.tensor(self.sood, dtype=self.dtype)


def _base_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Seeded float64 score pairs, one per situation the metrics must handle."""

    rng = np.random.default_rng

    def normal(seed: int, n_id: int, n_ood: int) -> tuple[np.ndarray, np.ndarray]:
        r = rng(seed)
        return r.normal(1.0, 1.0, n_id), r.normal(0.0, 1.2, n_ood)

    def grid(seed: int, n_id: int, n_ood: int, step: float) -> tuple[np.ndarray, np.ndarray]:
        sid, sood = normal(seed, n_id, n_ood)  # coarse grid: ID/ID, OOD/OOD and ID/OOD ties
        return np.round(sid / step) * step, np.round(sood / step) * step

    r = rng(7)
    # N_ID mostly with frac(0.05 N) or frac(0.2 N) >= 0.5, where the reference FPR's round()
    # and the exact ROC's floor pick different ID ranks.
    return {
        "continuous": normal(0, 713, 500),
        # Six distinct values (ID 1-5, OOD 0-4): most threshold groups mix ID and OOD.
        "heavy_ties": (rng(1).integers(1, 6, 430) * 1.0, rng(2).integers(0, 5, 300) * 1.0),
        "all_equal": (np.full(40, -3.25), np.full(25, -3.25)),
        "tiny_1v1": normal(3, 1, 1),
        "tiny_2v3": normal(4, 2, 3),
        "tiny_3v2_ties": grid(5, 3, 2, 1.0),
        "tiny_3v1": normal(6, 3, 1),
        "unbalanced_10to1": normal(8, 1019, 101),
        "unbalanced_1to10_ties": grid(9, 70, 700, 0.1),
        # logsumexp-energy scale: float32 spacing here is ~1e-5, a sigmoid would saturate.
        "energy_50_200": (r.uniform(110.0, 200.0, 530), r.uniform(50.0, 140.0, 400)),
        # Differences of ~1e-9 at 150: distinct in float64, all one value in float32.
        "below_float32_resolution": (
            150.0 + 1e-9 * r.normal(1.0, 1.0, 300),
            150.0 + 1e-9 * r.normal(0.0, 1.0, 200),
        ),
    }


def _cases() -> list[Case]:
    cases = []
    for seed, (name, (sid, sood)) in enumerate(_base_arrays().items()):
        for dtype in (torch.float64, torch.float32):
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            cases.append(
                Case(
                    name=f"{name}-{str(dtype).removeprefix('torch.')}",
                    # Round to the dtype once; references see the same (widened) values.
                    sid=np.asarray(sid).astype(np_dtype).astype(np.float64),
                    sood=np.asarray(sood).astype(np_dtype).astype(np.float64),
                    dtype=dtype,
                    seed=seed,
                    correct=np.random.default_rng(3000 + seed).random(len(sid)) < 0.7,
                )
            )
    return cases


CASES = _cases()
CASE_BY_NAME = {c.name: c for c in CASES}


# -- feeding the classes -------------------------------------------------------------------
Part = tuple[np.ndarray, np.ndarray, np.ndarray]  # (scores, is_id, correct)


def _pooled(case: Case) -> Part:
    # OOD samples get random "correctness": there is no label, the CCR metrics must ignore it.
    ood_noise = np.random.default_rng(4000 + case.seed).random(len(case.sood)) < 0.5
    return (
        np.r_[case.sid, case.sood],
        np.r_[np.ones(len(case.sid)), np.zeros(len(case.sood))],
        np.r_[case.correct, ood_noise],
    )


def _rank_parts(case: Case) -> list[Part]:
    """Two disjoint parts of the shuffled samples, about 30/70 (each non-empty, so uneven
    whenever there are 3 or more samples)."""
    scores, is_id, correct = _pooled(case)
    order = np.random.default_rng(1000 + case.seed).permutation(len(scores))
    cut = min(max(1, round(0.3 * len(scores))), len(scores) - 1)
    return [(scores[idx], is_id[idx], correct[idx]) for idx in (order[:cut], order[cut:])]


Batch = tuple[Tensor, Labels, Tensor | None]  # (scores, is_id, correct)


def _batches(part: Part, dtype: torch.dtype, seed: int) -> list[Batch]:
    """Shuffled uneven batches of ``part``, ID and OOD interleaved, using every label form:
    a (B,) bool tensor, a (B,) int 0/1 tensor, and a pure-ID batch labelled ``True`` followed
    by a pure-OOD batch labelled ``False`` (whose correctness is passed as None)."""
    scores, is_id, correct = part
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scores))
    n_cuts = min(4, len(scores) - 1)
    cuts = np.sort(rng.choice(np.arange(1, len(scores)), size=n_cuts, replace=False))
    out: list[Batch] = []
    for i, idx in enumerate(np.split(order, cuts)):
        s, y = torch.tensor(scores[idx], dtype=dtype), torch.tensor(is_id[idx] == 1)
        c = torch.tensor(correct[idx])
        if i % 3 == 0:
            out.append((s, y, c))
        elif i % 3 == 1:
            out.append((s, y.to(torch.int64), c.to(torch.int64)))
        else:
            if y.any():
                out.append((s[y], True, c[y]))
            if (~y).any():
                out.append((s[~y], False, None))
    return out


# -- what is computed -----------------------------------------------------------------------
#: Functional value of every metric key: METRIC_NAMES plus the ``method="reference"`` FPRs.
FUNCTIONAL: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "fpr95": lambda i, o: fpr_at_tpr(i, o, 0.95),
    "fpr80": lambda i, o: fpr_at_tpr(i, o, 0.80),
    "fpr95_oodpos": lambda i, o: fpr_at_tpr(i, o, 0.95, positive="ood"),
    "auroc": auroc,
    "aupr_in": aupr_in,
    "aupr_out": aupr_out,
    "detection_acc": detection_accuracy,
    "fpr95_reference": lambda i, o: fpr_at_tpr(i, o, 0.95, method="reference"),
    "fpr80_reference": lambda i, o: fpr_at_tpr(i, o, 0.80, method="reference"),
}


#: CCR rates: OpenOOD's four, plus two that move the threshold in the 1-3 sample cases.
CCR_RATES: tuple[float, ...] = (*CCR_FPRS, 0.5, 1.0)
#: Functional CCR values, ``"roc"`` under :func:`ccr_name`, ``"openood"`` with a suffix.
CCR_FUNCTIONAL: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    **{
        ccr_name(t): (lambda i, o, c, t=t: ccr_at_fpr(i, o, c, t))  # type: ignore[misc]
        for t in CCR_RATES
    },
    **{
        f"{ccr_name(t)}_openood": (
            lambda i, o, c, t=t: ccr_at_fpr(i, o, c, t, method="openood")  # type: ignore[misc]
        )
        for t in CCR_RATES
    },
}


@dataclass(frozen=True)
class ClassSpec:
    """A configured Metric class and the functional key its ``compute()`` must equal
    (``None``: it returns a dict keyed by ``dict_keys``, each with ``suffix`` appended to
    give the functional key). ``with_correct``: ``update`` takes correctness (CCR)."""

    name: str
    make: Callable[[], OODScoreMetric]
    key: str | None
    with_correct: bool = False
    dict_keys: tuple[str, ...] = METRIC_NAMES
    suffix: str = ""


CLASS_SPECS = (
    ClassSpec("OODMetrics", OODMetrics, None),
    ClassSpec("FPRAtTPR", FPRAtTPR, "fpr95"),
    ClassSpec("FPRAtTPR-tpr0.8", lambda: FPRAtTPR(tpr=0.8), "fpr80"),
    ClassSpec("FPRAtTPR-oodpos", lambda: FPRAtTPR(positive="ood"), "fpr95_oodpos"),
    ClassSpec("FPRAtTPR-reference", lambda: FPRAtTPR(method="reference"), "fpr95_reference"),
    ClassSpec(
        "FPRAtTPR-tpr0.8-reference",
        lambda: FPRAtTPR(tpr=0.8, method="reference"),
        "fpr80_reference",
    ),
    ClassSpec("OODAUROC", OODAUROC, "auroc"),
    ClassSpec("AUPR", AUPR, "aupr_in"),
    ClassSpec("AUPR-ood", lambda: AUPR(positive="ood"), "aupr_out"),
    ClassSpec("DetectionAccuracy", DetectionAccuracy, "detection_acc"),
    ClassSpec("CCRAtFPR", CCRAtFPR, "ccr_fpr1e-4", with_correct=True),
    ClassSpec(
        "CCRAtFPR-0.5-openood",
        lambda: CCRAtFPR(0.5, method="openood"),
        "ccr_fpr5e-1_openood",
        with_correct=True,
    ),
    ClassSpec(
        "CCRMetrics",
        lambda: CCRMetrics(CCR_RATES),
        None,
        with_correct=True,
        dict_keys=tuple(ccr_name(t) for t in CCR_RATES),
    ),
    ClassSpec(
        "CCRMetrics-openood",
        lambda: CCRMetrics(CCR_RATES, method="openood"),
        None,
        with_correct=True,
        dict_keys=tuple(ccr_name(t) for t in CCR_RATES),
        suffix="_openood",
    ),
)


def _class_values(spec: ClassSpec, value: Any) -> dict[str, Tensor]:
    """``compute()`` output as {functional key: 0-d tensor}."""
    if spec.key is None:
        assert list(value) == list(spec.dict_keys), spec.name
        return {f"{k}{spec.suffix}": v for k, v in value.items()}
    return {spec.key: value}


def _run_class(spec: ClassSpec, parts: list[Part], case: Case) -> dict[str, float]:
    """One instance per part (merged with ``merge_state`` when several), then ``compute()``."""
    metrics = []
    for j, part in enumerate(parts):
        metric = spec.make()
        for scores, is_id, correct in _batches(part, case.dtype, seed=case.seed * 10 + j):
            if spec.with_correct:
                metric.update(scores, is_id, correct)  # type: ignore[call-arg]
            else:
                metric.update(scores, is_id)
        metrics.append(metric)
    for other in metrics[1:]:
        metrics[0].merge_state(other)
    values = _class_values(spec, metrics[0].compute())
    for key, v in values.items():
        assert v.dtype == torch.float64 and v.dim() == 0, (spec.name, key)
    return {k: float(v) for k, v in values.items()}


@cache
def functional_values(case_name: str) -> dict[str, float]:
    case = CASE_BY_NAME[case_name]
    sid, sood = case.tensors()
    values = {k: fn(sid, sood) for k, fn in FUNCTIONAL.items()}
    correct = torch.from_numpy(case.correct)
    values |= {k: fn(sid, sood, correct) for k, fn in CCR_FUNCTIONAL.items()}
    for key, v in values.items():
        assert v.dtype == torch.float64 and v.dim() == 0, key
    return {k: float(v) for k, v in values.items()}


def sklearn_values(sid: np.ndarray, sood: np.ndarray) -> dict[str, float]:
    """Every key of :data:`FUNCTIONAL` from scikit-learn (conventions: module docstring)."""
    y = np.r_[np.ones(len(sid)), np.zeros(len(sood))]
    s = np.r_[sid, sood]
    fpr, tpr, thr = roc_curve_sk(y, s, drop_intermediate=False)
    fpr_o, tpr_o, _ = roc_curve_sk(1 - y, -s, drop_intermediate=False)

    def first_reaching(target: float, fpr_: np.ndarray, tpr_: np.ndarray) -> float:
        return fpr_[np.argmax(tpr_ >= target)]

    def reference_rule(target: float) -> float:
        # round(1 - target, 12): the literal 0.05 of the reference code (1 - 0.95 is not).
        k = min(round(round(1 - target, 12) * len(sid)), len(sid) - 1)
        i = int(np.flatnonzero(thr == np.sort(sid)[k])[0])
        return fpr[i - 1]  # thresholds[0] is +inf, so i >= 1

    return {
        "fpr95": first_reaching(0.95, fpr, tpr),
        "fpr80": first_reaching(0.80, fpr, tpr),
        "fpr95_oodpos": first_reaching(0.95, fpr_o, tpr_o),
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "detection_acc": np.max(0.5 * (tpr + (1 - fpr))),
        "fpr95_reference": reference_rule(0.95),
        "fpr80_reference": reference_rule(0.80),
    }


def ccr_reference_values(sid: np.ndarray, sood: np.ndarray, correct: np.ndarray) -> dict:
    """Every key of :data:`CCR_FUNCTIONAL`, computed without the package's code.

    ``"roc"``: over every candidate threshold (each distinct score, accepting ``s >= thr``,
    and +inf accepting nothing), the best ``#{correct ID accepted} / N_ID`` among those whose
    ``#{OOD accepted} / N_OOD <= t``. ``"openood"``: OpenOOD v1.5 ``ccr_fpr`` on its own
    inputs (``conf``, ``pred``, ``label`` with -1 for OOD), line for line.
    """
    out: dict[str, float] = {}
    candidates = np.r_[np.unique(np.r_[sid, sood]), np.inf]
    fpr = np.array([np.mean(sood >= thr) for thr in candidates])
    ccr = np.array([np.sum((sid >= thr) & correct) / len(sid) for thr in candidates])
    # OpenOOD's inputs: ID labels 0..9, predictions right where ``correct``, OOD label -1.
    label = np.r_[np.arange(len(sid)) % 10, -np.ones(len(sood), dtype=int)]
    pred = np.r_[
        np.where(correct, label[: len(sid)], (label[: len(sid)] + 1) % 10), label[len(sid) :]
    ]
    conf = np.r_[sid, sood]
    for t in CCR_RATES:
        out[ccr_name(t)] = float(ccr[fpr <= t].max())
        out[f"{ccr_name(t)}_openood"] = float(_openood_ccr_fpr(conf, t, pred, label))
    return out


def _openood_ccr_fpr(conf: np.ndarray, fpr: float, pred: np.ndarray, label: np.ndarray) -> float:
    """OpenOOD v1.5 ``openood/evaluators/metrics.py::ccr_fpr``, re-typed from its definition."""
    ind_conf = conf[label != -1]
    ind_pred = pred[label != -1]
    ind_label = label[label != -1]
    ood_conf = conf[label == -1]
    num_ind = len(ind_conf)
    num_ood = len(ood_conf)
    fp_num = int(np.ceil(fpr * num_ood))
    thresh = np.sort(ood_conf)[-fp_num]
    num_tp = np.sum((ind_conf > thresh) * (ind_pred == ind_label))
    return num_tp / num_ind


# -- DDP: one process group for every case and class ---------------------------------------
def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        out: dict[str, dict[str, Any]] = {}
        for case in CASES:
            part = _rank_parts(case)[rank]
            out[case.name] = {"n_local": len(part[0])}
            for spec in CLASS_SPECS:
                out[case.name][spec.name] = _run_class(spec, [part], case)
        # json: float repr round-trips float64 exactly.
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per-rank results of one 2-rank gloo run over all cases."""
    tmp = tmp_path_factory.mktemp("ddp")
    # fork reuses this process's imports (spawn re-imports torch, torchmetrics and the package
    # in every rank: about 10 s on 2 cores); no process group exists here before the fork.
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _ddp_worker,
        args=(str(tmp / "init"), str(tmp)),
        nprocs=WORLD_SIZE,
        join=True,
        start_method=start_method,
    )
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


# -- the harness -----------------------------------------------------------------------------
def _mismatches(got: dict[str, float], want: dict[str, float], tol: float) -> list[str]:
    return [
        f"{k}: got {float(got[k])!r}, want {float(want[k])!r} (diff {got[k] - want[k]:.3g})"
        for k in got
        if not abs(got[k] - want[k]) <= tol
    ]


MODES = ("sklearn", "class", "merged", pytest.param("ddp", marks=pytest.mark.timeout(120)))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("mode", MODES)
def test_metric_matches_reference(mode: str, case: Case, request: pytest.FixtureRequest) -> None:
    want = functional_values(case.name)
    errors: list[str] = []
    if mode == "sklearn":
        reference = sklearn_values(case.sid, case.sood)
        reference |= ccr_reference_values(case.sid, case.sood, case.correct)
        errors += _mismatches(want, reference, SKLEARN_TOL)
        fused_ccr = ccr_metric_tensors(*case.tensors(), torch.from_numpy(case.correct), CCR_RATES)
        errors += [
            f"ccr_metric_tensors {e}"
            for e in _mismatches({k: float(v) for k, v in fused_ccr.items()}, want, 0.0)
        ]
        fused = {k: float(v) for k, v in ood_metric_tensors(*case.tensors()).items()}
        assert list(fused) == list(METRIC_NAMES)
        errors += [f"ood_metric_tensors {e}" for e in _mismatches(fused, want, 0.0)]
    elif mode in ("class", "merged"):
        parts = [_pooled(case)] if mode == "class" else _rank_parts(case)
        for spec in CLASS_SPECS:
            got = _run_class(spec, parts, case)
            errors += [f"{spec.name} {e}" for e in _mismatches(got, want, 0.0)]
    else:
        results = request.getfixturevalue("ddp_results")
        n_local = [r[case.name]["n_local"] for r in results]
        assert sum(n_local) == len(case.sid) + len(case.sood)
        for rank, res in enumerate(results):
            for spec in CLASS_SPECS:
                got = res[case.name][spec.name]
                errors += [f"rank {rank} {spec.name} {e}" for e in _mismatches(got, want, 0.0)]
    assert not errors, f"{mode} / {case.name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_roc_curve_matches_sklearn(case: Case) -> None:
    # The curve every reference above reads its points from: identical point for point.
    y = np.r_[np.ones(len(case.sid)), np.zeros(len(case.sood))]
    s = np.r_[case.sid, case.sood]
    for positive, labels, scores in (("id", y, s), ("ood", 1 - y, -s)):
        fpr, tpr, _ = roc_curve_sk(labels, scores, drop_intermediate=False)
        tp, fp = roc_counts(*case.tensors(), positive=positive)
        np.testing.assert_array_equal(tp.numpy() / int(tp[-1]), tpr)
        np.testing.assert_array_equal(fp.numpy() / int(fp[-1]), fpr)
        fpr_t, tpr_t = roc_curve(*case.tensors(), positive=positive)
        np.testing.assert_array_equal(fpr_t.numpy(), fpr)
        np.testing.assert_array_equal(tpr_t.numpy(), tpr)


def test_harness_covers_every_metric() -> None:
    assert set(METRIC_NAMES) <= set(FUNCTIONAL)
    from_classes = {s.key for s in CLASS_SPECS if s.key} | {
        f"{k}{s.suffix}" for s in CLASS_SPECS if s.key is None for k in s.dict_keys
    }
    assert from_classes == set(FUNCTIONAL) | set(CCR_FUNCTIONAL)
    exported = {
        obj
        for obj in (getattr(modular, n) for n in modular.__all__)
        if isinstance(obj, type) and issubclass(obj, Metric)
    }
    covered = {type(spec.make()) for spec in CLASS_SPECS}
    # OODScoreMetric is the abstract base: it accumulates but has no metric to compute.
    assert exported - covered == {OODScoreMetric}
    base = OODScoreMetric()
    base.update(torch.ones(2), torch.tensor([True, False]))
    with pytest.raises(NotImplementedError):
        base.compute()
    for spec in CLASS_SPECS:
        metric = spec.make()
        want = True if spec.with_correct else None if spec.key is None else "fpr" not in spec.key
        assert metric.higher_is_better is want, spec.name
        assert metric.full_state_update is False, spec.name
