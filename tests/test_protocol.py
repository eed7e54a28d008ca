"""The one evaluation protocol and the one report: seeded hold-out, per-set combiners that
never become the model's, non-finite reporting, averages, and the shared table format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_ood import report
from lightning_ood.detectors import build_detector
from lightning_ood.metrics import CCR_NAMES, METRIC_NAMES, ccr_metrics, ood_metrics
from lightning_ood.protocol import (
    average,
    averages,
    check_holdout,
    evaluate_detectors,
    evaluate_pair,
    holdout_splits,
    holds_out,
    per_set_parts,
    per_set_row,
    per_set_selected,
)
from lightning_ood.splits import seeded_parts


def _bank(seed: int, n: int, shift: float, k: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, k) if k else (n,)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + shift).double()


def test_evaluate_pair_metrics_and_nonfinite_counts() -> None:
    s_id, s_ood = _bank(0, 50, 1.0), _bank(1, 40, 0.0)
    got = evaluate_pair(s_id, s_ood)
    assert {k: got[k] for k in METRIC_NAMES} == ood_metrics(s_id, s_ood)
    assert (got["n_id"], got["n_ood"], got["nonfinite_id"], got["nonfinite_ood"]) == (50, 40, 0, 0)
    s_ood[[3, 7]] = torch.tensor([math.nan, math.inf], dtype=torch.float64)
    bad = evaluate_pair(s_id, s_ood)
    assert all(math.isnan(bad[m]) for m in METRIC_NAMES)
    assert (bad["nonfinite_id"], bad["nonfinite_ood"]) == (0, 2)


def test_average_is_nan_when_any_set_is() -> None:
    a = dict.fromkeys(METRIC_NAMES, 0.2)
    b = dict.fromkeys(METRIC_NAMES, 0.4)
    assert average({"a": a, "b": b})["auroc"] == pytest.approx(0.3)
    assert math.isnan(average({"a": a, "b": {**b, "auroc": math.nan}})["auroc"])


def test_holdout_is_the_seeded_permutation_and_checks_sizes() -> None:
    splits = holdout_splits({"id": 20, "ood": 12}, 5, seed=42)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(42))
    assert splits["id"][0].tolist() == perm[:5].tolist()
    assert splits["id"][1].tolist() == perm[5:].tolist()
    assert [p.tolist() for p in seeded_parts(20, [5], 42)] == [t.tolist() for t in splits["id"]]
    with pytest.raises(ValueError, match=r"'ood' has 12 samples but per_set_holdout=12"):
        holdout_splits({"ood": 12}, 12, seed=42)
    cv = build_detector("fssd", {"taps": ["a", "b"]})  # LogisticRegressionCV: 5-fold
    with pytest.raises(ValueError, match=r"per_set_holdout=4 is too small for detector 'f'"):
        check_holdout({"id": 100}, 4, {"f": cv})
    check_holdout({"id": 100}, 5, {"f": cv})


def test_per_set_combiners_are_fitted_on_held_out_samples_and_not_kept() -> None:
    maha = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
    energy = build_detector("energy")
    dets = {"maha": maha, "energy": energy}
    assert holds_out(maha, 2, 10) and not holds_out(maha, 1, 10) and not holds_out(maha, 2, 0)
    assert not holds_out(energy, 1, 10)
    names = ["id", "near", "far"]
    comps = [_bank(0, 60, 1.0, 2), _bank(1, 40, 0.0, 2), _bank(2, 30, -1.0, 2)]
    plain = [_bank(3, 60, 1.0), _bank(4, 40, 0.0), _bank(5, 30, -1.0)]
    before = maha.combiner_state()
    result = evaluate_detectors(
        dets, {"maha": comps, "energy": plain}, names, per_set_holdout=10, seed=7
    )
    assert result.held_out_per_set == 10
    # The model's own combiner is untouched (still unfitted): per-set fits are the protocol's.
    after = maha.combiner_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    split = holdout_splits({"id": 60, "near": 40, "far": 30}, 10, seed=7)
    for j, ood in enumerate(names[1:], start=1):
        oracle = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
        oracle.fit_combiner(comps[0][split["id"][0]], comps[j][split[ood][0]])
        s_id = oracle.combine(comps[0][split["id"][1]])
        s_ood = oracle.combine(comps[j][split[ood][1]])
        row = result.metrics[per_set_row("maha")][ood]  # the papers' protocol, its own row
        assert row["auroc"] == ood_metrics(s_id, s_ood)["auroc"]
        assert (row["n_id"], row["n_ood"]) == (50, len(comps[j]) - 10)
        # the row named after the detector is what it ships: its own combiner (none fitted
        # here: default_layer, the last tap) on every sample
        shipped = result.metrics["maha"][ood]
        assert shipped == {
            **ood_metrics(comps[0][:, -1], comps[j][:, -1]),
            "n_id": 60, "n_ood": len(comps[j]), "nonfinite_id": 0, "nonfinite_ood": 0,
        }  # fmt: skip
        assert result.combiners["maha"][ood]["combiner_coef"] == oracle.combiner_coef.tolist()
        # detectors without a combiner keep every sample
        e = result.metrics["energy"][ood]
        assert (e["n_id"], e["n_ood"]) == (60, len(plain[j]))
        assert e["fpr95"] == ood_metrics(plain[0], plain[j])["fpr95"]
    assert result.held_out_for == ["maha"]
    avg = result.metrics["energy"]["average"]["auroc"]
    assert (
        avg
        == (result.metrics["energy"]["near"]["auroc"] + result.metrics["energy"]["far"]["auroc"])
        / 2
    )


def test_fixed_combiners_are_loaded_not_fitted_and_report_the_same_samples() -> None:
    """FSSD Figure 5: combiners of a clean run applied to corrupted data's components."""
    maha = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
    names, sizes = ["id", "ood"], {"id": 60, "ood": 40}
    clean = [_bank(0, 60, 1.0, 2), _bank(1, 40, -1.0, 2)]
    noisy = [_bank(2, 60, 0.5, 2) * 3.0, _bank(3, 40, -0.5, 2) * 3.0]
    first = evaluate_detectors({"m": maha}, {"m": clean}, names, per_set_holdout=10, seed=7)
    # Round trip through JSON, as the callback reads it from an earlier ood_results.json.
    record = json.loads(json.dumps(first.combiners))
    again = evaluate_detectors(
        {"m": maha}, {"m": clean}, names, per_set_holdout=10, seed=7, combiners=record
    )
    assert again.metrics == first.metrics and again.combiners == first.combiners
    got = evaluate_detectors(
        {"m": maha}, {"m": noisy}, names, per_set_holdout=10, seed=7, combiners=record
    )
    # By hand: the clean run's logistic regression on the noisy run's reported samples.
    c = {k: torch.tensor(v, dtype=torch.float64) for k, v in record["m"]["ood"].items()}
    split = holdout_splits(sizes, 10, seed=7)

    def lr(x: torch.Tensor) -> torch.Tensor:
        z = (x - c["combiner_mean"]) / c["combiner_scale"]
        return z @ c["combiner_coef"] + c["combiner_intercept"]

    s_id, s_ood = lr(noisy[0][split["id"][1]]), lr(noisy[1][split["ood"][1]])
    assert got.metrics[per_set_row("m")]["ood"]["auroc"] == ood_metrics(s_id, s_ood)["auroc"]
    assert got.metrics[per_set_row("m")]["ood"]["n_id"] == 50
    assert got.combiners == first.combiners
    refit = evaluate_detectors({"m": maha}, {"m": noisy}, names, per_set_holdout=10, seed=7)
    assert refit.combiners != first.combiners  # without them, the noisy hold-out is fitted
    assert not maha.flag("combiner_fitted")  # and the model's own combiner is never replaced

    def fixed(combiners: dict, **kw: int) -> None:
        evaluate_detectors(
            {"m": maha, "e": build_detector("energy")},
            {"m": noisy, "e": [_bank(4, 60, 0.0), _bank(5, 40, 0.0)]},
            names,
            **{"per_set_holdout": 10, "seed": 7, **kw},
            combiners=combiners,
            combiners_source="run.json",
        )

    with pytest.raises(ValueError, match=r"run.json has no combiner for \['m/ood'\]"):
        fixed({"m": {"other": record["m"]["ood"]}})
    three = {"m": {"ood": {**record["m"]["ood"], "combiner_coef": [1.0, 2.0, 3.0]}}}
    with pytest.raises(ValueError, match=r"'m' for 'ood' has 3 weights, but 'm' has 2 comp"):
        fixed(three)
    with pytest.raises(ValueError, match=r"combiners for \['m'\], which are not evaluated"):
        fixed(record, per_set_holdout=0)


def test_nonfinite_scores_warn_and_report_nan() -> None:
    energy = build_detector("energy")
    s_ood = _bank(1, 30, 0.0)
    s_ood[0] = math.nan
    messages: list[str] = []
    result = evaluate_detectors(
        {"energy": energy},
        {"energy": [_bank(0, 30, 1.0), s_ood]},
        ["id", "x"],
        warn=messages.append,
    )
    assert math.isnan(result.metrics["energy"]["x"]["auroc"])
    assert result.metrics["energy"]["x"]["nonfinite_ood"] == 1
    assert len(messages) == 1 and "'energy' produced non-finite scores on 'x'" in messages[0]


def test_empty_set_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"test set 'x' produced no samples"):
        evaluate_detectors(
            {"energy": build_detector("energy")},
            {"energy": [_bank(0, 5, 1.0), torch.zeros(0, dtype=torch.float64)]},
            ["id", "x"],
        )


# -- report -----------------------------------------------------------------------------------
def test_headers_name_direction_and_positive_class() -> None:
    assert report.HEADERS == {
        "fpr95": "FPR95↓ (ID+)",
        "fpr80": "FPR80↓ (ID+)",
        "fpr95_oodpos": "FPR95↓ (OOD+)",
        "auroc": "AUROC↑",
        "aupr_in": "AUPR-In↑",
        "aupr_out": "AUPR-Out↑",
        "detection_acc": "DetAcc↑",
    }


def test_table_and_files(tmp_path: Path) -> None:
    vals = {**dict.fromkeys(METRIC_NAMES, 0.12345), "auroc": math.nan}
    counts = {"n_id": 3, "n_ood": 4, "nonfinite_id": 0, "nonfinite_ood": 1}
    metrics = {"energy": {"mnist": {**vals, **counts}, "average": dict(vals)}}
    lines = report.metrics_table(metrics)
    assert lines[0].startswith("| detector | OOD set | FPR95↓ (ID+) | FPR80↓ (ID+) |")
    assert lines[2] == "| energy | mnist | 12.35 | 12.35 | 12.35 | nan | 12.35 | 12.35 | 12.35 |"
    assert len(lines) == 3  # one OOD set: its average row would repeat it
    results = {
        "id_set": "f",
        "data_version": "v",
        "model": "m",
        "convention": "c",
        "metrics": metrics,
    }
    paths = report.write_results(
        tmp_path, "ood_results", results, report.format_markdown(results), metrics
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ood_results.csv",
        "ood_results.json",
        "ood_results.md",
    ]
    assert set(paths) == set(tmp_path.iterdir())
    csv_lines = (tmp_path / "ood_results.csv").read_text().splitlines()
    assert (
        csv_lines[0]
        == "detector,ood_set,"
        + ",".join((*METRIC_NAMES, *CCR_NAMES))  # CCR columns always (empty: not computed)
        + ",n_id,n_ood,nonfinite_id,nonfinite_ood"
    )
    assert csv_lines[1].endswith(",3,4,0,1") and len(csv_lines) == 3
    assert (
        json.loads((tmp_path / "ood_results.json").read_text())["metrics"]["energy"]["mnist"][
            "n_id"
        ]
        == 3
    )


def test_nonfinite_held_out_components_report_nan_not_a_crash() -> None:
    """A NaN among the samples a combiner would be fitted on: that (detector, set) reports NaN
    with its counts, the other detectors and sets are evaluated as usual."""
    maha = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
    energy = build_detector("energy")
    comps = [_bank(0, 60, 1.0, 2), _bank(1, 40, 0.0, 2), _bank(2, 30, -1.0, 2)]
    split = holdout_splits({"id": 60, "near": 40, "far": 30}, 10, seed=7)
    comps[1][split["near"][0][0], 1] = math.inf  # a held-out sample of 'near'
    messages: list[str] = []
    result = evaluate_detectors(
        {"maha": maha, "energy": energy},
        {"maha": comps, "energy": [_bank(3, 60, 1.0), _bank(4, 40, 0.0), _bank(5, 30, -1.0)]},
        ["id", "near", "far"],
        per_set_holdout=10,
        seed=7,
        warn=messages.append,
    )
    row = per_set_row("maha")
    near, far = result.metrics[row]["near"], result.metrics[row]["far"]
    assert all(math.isnan(near[m]) for m in METRIC_NAMES) and near["nonfinite_ood"] == 1
    assert not math.isnan(far["auroc"]) and "near" not in result.combiners["maha"]
    assert math.isnan(result.metrics[row]["average"]["auroc"])
    assert not math.isnan(result.metrics["energy"]["near"]["auroc"])
    # the shipped score (the last tap) sees the same inf: NaN with its count, not a crash
    assert result.metrics["maha"]["near"]["nonfinite_ood"] == 1
    assert not math.isnan(result.metrics["maha"]["far"]["auroc"])
    assert len(messages) == 2 and all("'near'" in m for m in messages)
    assert "detector 'maha' " in messages[0] and f"detector '{row}' " in messages[1]


def test_evaluate_pair_ccr_by_hand_and_group_averages() -> None:
    """CCR@FPR of a hand-computed toy: ID scores 4, 3, 2, 1 (the one at 3 misclassified),
    ten OOD scores, one at 2.5 and nine at 0. FPR 0.1 may accept one OOD sample: the
    threshold is the second-highest OOD score (0), every ID sample passes, 3 of 4 are correct;
    the smaller rates accept none: only 4 and 3 pass 2.5, 1 of 4 correct."""
    s_id = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    s_ood = torch.tensor([2.5] + [0.0] * 9, dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    got = evaluate_pair(s_id, s_ood, correct)
    assert [got[k] for k in CCR_NAMES] == [0.25, 0.25, 0.25, 0.75]
    assert {k: got[k] for k in METRIC_NAMES} == ood_metrics(s_id, s_ood)
    assert not any(k in evaluate_pair(s_id, s_ood) for k in CCR_NAMES)  # no labels: none
    broken = evaluate_pair(s_id, torch.tensor([math.nan, 0.0], dtype=torch.float64), correct)
    assert all(math.isnan(broken[k]) for k in CCR_NAMES) and broken["nonfinite_ood"] == 1
    # averages: CCR keys too, and one row per group (plain means over its sets)
    rows = {
        "a": {**dict.fromkeys(METRIC_NAMES, 0.2), **dict.fromkeys(CCR_NAMES, 0.1)},
        "b": {**dict.fromkeys(METRIC_NAMES, 0.4), **dict.fromkeys(CCR_NAMES, 0.3)},
        "c": {**dict.fromkeys(METRIC_NAMES, 0.9), **dict.fromkeys(CCR_NAMES, 0.5)},
    }
    out = averages(rows, {"a": "near", "b": "far", "c": "far"})
    assert list(out) == ["average", "average[near]", "average[far]"]
    assert out["average"]["auroc"] == pytest.approx(0.5) and out["average"][CCR_NAMES[0]] == 0.3
    assert out["average[near]"]["auroc"] == 0.2
    assert out["average[far]"]["auroc"] == pytest.approx(0.65)
    assert out["average[far]"][CCR_NAMES[-1]] == pytest.approx(0.4)
    assert list(averages(rows)) == ["average"]


def test_evaluate_detectors_ccr_indexes_the_held_out_id_rows() -> None:
    """The papers' per-set row reports CCR on the ID samples it reports (the hold-out's
    remainder, ``correct_id`` indexed like the ID scores); the shipped row on every sample."""
    maha = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
    maha.fit_id_only_combiner(_bank(5, 60, 1.0, 2))  # what it ships
    banks = [_bank(0, 60, 1.0, 2), _bank(1, 40, -1.0, 2)]
    correct = torch.arange(60) % 3 != 0
    ev = evaluate_detectors(
        {"m": maha}, {"m": banks}, ["id", "ood"], per_set_holdout=10, seed=7, correct_id=correct
    )
    kept = holdout_splits({"id": 60, "ood": 40}, 10, 7)["id"][1]
    s_id, s_ood = ev.scores[per_set_row("m")]["ood"]
    want = ccr_metrics(s_id, s_ood, correct[kept])
    assert {k: ev.metrics[per_set_row("m")]["ood"][k] for k in CCR_NAMES} == want
    shipped = ccr_metrics(maha.combine(banks[0]), maha.combine(banks[1]), correct)
    assert {k: ev.metrics["m"]["ood"][k] for k in CCR_NAMES} == shipped
    with pytest.raises(ValueError, match=r"correct_id has 59 entries but the ID set 'id' has 60"):
        evaluate_detectors({"m": maha}, {"m": banks}, ["id", "ood"], correct_id=correct[:59])


def test_per_set_selection_fits_selects_and_reports_on_disjoint_parts() -> None:
    """The papers' per-set protocol with selection: per OOD set, each candidate's combiner on
    the combiner parts, the best AUROC on the selection parts, the chosen one alone on the
    reported parts; the candidates keep their own combiners."""
    sizes = {"id": 70, "near": 50, "far": 40}
    parts = per_set_parts(sizes, 10, 20, seed=3)
    # the combiner part is the per-set rows' hold-out: the same permutation
    hold = holdout_splits(sizes, 10, seed=3)
    for n in sizes:
        assert torch.equal(parts[n]["combiner"], hold[n][0])
        assert torch.equal(torch.cat([parts[n]["selection"], parts[n]["reported"]]), hold[n][1])
        assert len(parts[n]["reported"]) == sizes[n] - 30
    # three candidates over 2 components; candidate c1 separates best (largest shift)
    shifts = {"c0": 0.3, "c1": 2.0, "c2": 1.0}
    data = {
        (c, n): _bank(7 * i + j, sizes[n], shift if n == "id" else 0.0, 2)
        for i, (c, shift) in enumerate(shifts.items())
        for j, n in enumerate(sizes)
    }
    cands = [
        build_detector(c, {"type": "mahalanobis", "taps": ["a", "b"], "combiner": "lr"})
        for c in shifts
    ]
    before = [c.combiner_state() for c in cands]
    calls: list[tuple[str, str, str]] = []

    def score(det, set_name: str, part: str) -> torch.Tensor:
        calls.append((det.name, set_name, part))
        return data[(det.name, set_name)][parts[set_name][part]]

    sel = per_set_selected(cands, score, "id", ["near", "far"], groups={"near": "g"})
    for ood in ("near", "far"):
        val = {}
        for c in shifts:
            oracle = build_detector("mahalanobis", {"taps": ["a", "b"], "combiner": "lr"})
            comp = {n: data[(c, n)] for n in ("id", ood)}
            oracle.fit_combiner(comp["id"][parts["id"]["combiner"]],
                                comp[ood][parts[ood]["combiner"]])  # fmt: skip
            val[c] = ood_metrics(
                oracle.combine(comp["id"][parts["id"]["selection"]]),
                oracle.combine(comp[ood][parts[ood]["selection"]]),
            )["auroc"]
            if c == "c1":
                reported = ood_metrics(
                    oracle.combine(comp["id"][parts["id"]["reported"]]),
                    oracle.combine(comp[ood][parts[ood]["reported"]]),
                )
                coef = oracle.combiner_coef.tolist()
        assert max(val, key=val.get) == "c1" == sel.choices[ood]["candidate"]
        assert sel.choices[ood]["index"] == 1 and sel.choices[ood]["val"]["auroc"] == val["c1"]
        assert sel.choices[ood]["combiner"]["combiner_coef"] == coef
        row = sel.metrics[ood]
        assert {k: row[k] for k in reported} == reported
        assert (row["n_id"], row["n_ood"]) == (40, sizes[ood] - 30)
    assert (
        sel.metrics["average"]["auroc"]
        == (sel.metrics["near"]["auroc"] + sel.metrics["far"]["auroc"]) / 2
    )
    assert sel.metrics["average[g]"]["auroc"] == sel.metrics["near"]["auroc"]
    # each part scored once (ID parts serve both OOD sets); reported parts only for c1
    assert len(calls) == len(set(calls))
    assert {(c, s) for c, s, p in calls if p == "reported"} == {
        ("c1", "id"),
        ("c1", "near"),
        ("c1", "far"),
    }
    for c, b in zip(cands, before, strict=True):
        assert all(torch.equal(b[k], v) for k, v in c.combiner_state().items())


def test_per_set_selection_of_plain_candidates_and_ties_and_errors() -> None:
    """Candidates without a combiner are measured on the selection parts directly; a tie on
    AUROC and FPR95 goes to the first candidate; bad input is refused."""
    sizes = {"id": 40, "ood": 40}
    parts = per_set_parts(sizes, 5, 15, seed=0)
    ident = {"id": torch.arange(40.0) + 100, "ood": torch.arange(40.0)}  # AUROC 1 for all
    cands = [build_detector(n, {"type": "energy"}) for n in ("e0", "e1")]
    sel = per_set_selected(cands, lambda d, n, p: ident[n][parts[n][p]], "id", ["ood"])
    assert sel.choices["ood"]["candidate"] == "e0" and "combiner" not in sel.choices["ood"]
    assert sel.metrics["ood"]["auroc"] == 1.0 and sel.metrics["ood"]["n_id"] == 20
    with pytest.raises(ValueError, match="select='nope' is not one of"):
        per_set_selected(cands, lambda d, n, p: ident[n], "id", ["ood"], select="nope")
    with pytest.raises(ValueError, match="candidate names must be unique"):
        per_set_selected([cands[0], cands[0]], lambda d, n, p: ident[n], "id", ["ood"])
    with pytest.raises(ValueError, match="no candidates"):
        per_set_selected([], lambda d, n, p: ident[n], "id", ["ood"])
