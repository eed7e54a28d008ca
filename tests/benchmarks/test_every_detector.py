"""The bookkeeping of ``benchmarks.every_detector`` on synthetic results (fast; the script's
whole path runs in ``test_quick.py -m slow``): disjoint slices, group summaries, merging a
detector registered after a kept run, costs measured only where missing, and admission."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from benchmarks import every_detector as ed
from lightning_ood.data.readers import Transformed


def _sliced(n: int = 23, step: int = 5, label: int | None = None) -> DataLoader:
    raw = TensorDataset(torch.arange(n).float(), torch.arange(n) % 3)
    return DataLoader(Transformed(Subset(raw, range(0, n, step)), lambda x: 10 * x, label), 4)


def test_shifted_reads_the_same_reader_at_an_offset() -> None:
    loader = _sliced(label=-1)
    view = ed.shifted(loader, 2, label=-1)
    xs, ys = zip(*[view.dataset[i] for i in range(len(view.dataset))], strict=True)
    assert [float(x) for x in xs] == [20.0, 70.0, 120.0, 170.0, 220.0]  # 2::5, transformed
    assert set(ys) == {-1} and view.batch_size == 4
    reported = {int(i) for i in loader.dataset.dataset.indices}
    assert reported.isdisjoint(view.dataset.dataset.indices)
    assert [view.dataset[i][1] for i in range(2)] == [-1, -1]
    ident = ed.shifted(_sliced(), 1)  # ID labels kept
    assert [ident.dataset[i][1] for i in range(3)] == [1, 0, 2]  # indices 1, 6, 11 mod 3


@pytest.mark.parametrize("offset", [0, 5, 7])
def test_shifted_refuses_an_offset_outside_the_slice(offset: int) -> None:
    with pytest.raises(SystemExit, match=f"offset {offset} does not fit"):
        ed.shifted(_sliced(), offset)


def test_shifted_refuses_an_unsliced_loader() -> None:
    with pytest.raises(SystemExit, match="expected a sliced reader"):
        ed.shifted(DataLoader(TensorDataset(torch.zeros(3))), 1)


def _metrics(auroc: float, fpr: float, near: float, far: float) -> dict[str, Any]:
    avg = {"auroc": auroc, "fpr95": fpr}
    return {
        "average": avg,
        "average[near]": {"auroc": near, "fpr95": fpr},
        "average[far]": {"auroc": far, "fpr95": fpr},
    }


def test_summarise_averages_runs_and_groups() -> None:
    runs = [
        {"default": {"metrics": {"a": _metrics(0.8, 0.4, 0.7, 0.9)}}},
        {"default": {"metrics": {"a": _metrics(0.6, 0.2, 0.5, 0.7)}}},
    ]
    row = ed.summarise(runs, "default")["a"]
    assert row["auroc"] == pytest.approx(0.7) and row["fpr95"] == pytest.approx(0.3)
    assert (row["auroc_min"], row["auroc_max"], row["runs"]) == (0.6, 0.8, 2)
    assert row["groups"]["near"]["auroc"] == pytest.approx(0.6)
    assert row["groups"]["far"] == {"auroc": pytest.approx(0.8), "fpr95": pytest.approx(0.3)}


def test_group_table_near_first_and_dash_for_untuned() -> None:
    default = {
        "a": {
            "groups": {"far": {"auroc": 0.9, "fpr95": 0.1}, "near": {"auroc": 0.7, "fpr95": 0.5}}
        },
        "b": {
            "groups": {"far": {"auroc": 0.8, "fpr95": 0.2}, "near": {"auroc": 0.6, "fpr95": 0.6}}
        },
    }
    tuned = {
        "a": {
            "groups": {"far": {"auroc": 0.95, "fpr95": 0.05}, "near": {"auroc": 0.75, "fpr95": 0.4}}
        }
    }
    lines = ed.group_table(["a", "b"], default, tuned, ["a"])
    assert "| detector | near AUROC | near FPR95 | far AUROC | far FPR95 |" in lines
    assert "| `a` | 70.00 / 75.00 | 50.00 / 40.00 | 90.00 / 95.00 | 10.00 / 5.00 |" in lines
    assert "| `b` | 60.00 / – | 60.00 / – | 80.00 / – | 20.00 / – |" in lines
    one = {"a": {"groups": {"far": {"auroc": 0.9, "fpr95": 0.1}}}}
    assert ed.group_table(["a"], one, {}, []) == []  # one group's mean is the average


def test_auroc_cell_shows_the_range_only_over_several_models() -> None:
    m = {"auroc": 0.9, "auroc_min": 0.85, "auroc_max": 0.95}
    assert ed.auroc_cell(m, 1) == "90.00"
    assert ed.auroc_cell(m, 3) == "90.00 [85.00–95.00]"


def _variant(names: list[str], tuned: list[str]) -> dict[str, Any]:
    return {
        "metrics": {n: {"average": {"auroc": 0.5, "fpr95": 0.5}} for n in names},
        "detectors": {n: {"kind": n} for n in names},
        "tuning": {"protocol": {"select": "auroc"}, "detectors": {n: {} for n in tuned}}
        if tuned
        else None,
    }


def test_complete_merges_only_the_missing_detectors(monkeypatch: pytest.MonkeyPatch) -> None:
    run = {
        "refused": {"mcd": "ValueError: mcd: no dropout"},
        "default": _variant(["msp", "react"], []),
        "tuned": _variant(["react"], ["react"]),
        "seconds": {"default": 1.0, "tuned": 2.0},
    }
    calls: list[Any] = []

    def fake(
        label: str, backbone: Any, sets: Any, tiny: Any, specs: Any, refused: Any, spaces: Any
    ) -> Any:
        calls.append((sorted(specs), refused, spaces))
        return {
            "refused": {"bad": "ValueError: bad: no"},
            "default": _variant(["core"], []),
            "tuned": _variant(["core"], ["core"]),
            "seconds": {"default": 3.0, "tuned": 4.0},
        }

    monkeypatch.setattr(ed, "evaluate_one", fake)
    specs = {"msp": {}, "react": {}, "mcd": {}, "core": {}, "bad": {}}
    loads: list[int] = []

    def data() -> tuple[Any, Any, Any]:
        loads.append(1)
        return "backbone", "sets", "tiny"

    assert ed.complete(run, specs, "m", data, {"core": {"x": [1]}})
    assert calls == [(["bad", "core"], {}, {"core": {"x": [1]}})] and loads == [1]
    assert set(run["default"]["metrics"]) == {"msp", "react", "core"}
    assert set(run["tuned"]["tuning"]["detectors"]) == {"react", "core"}
    assert run["refused"] == {"mcd": "ValueError: mcd: no dropout", "bad": "ValueError: bad: no"}
    assert run["added_later"] == {n: {"default": 3.0, "tuned": 4.0} for n in ("bad", "core")}
    assert run["seconds"] == {"default": 1.0, "tuned": 2.0}
    # nothing missing any more: no data loaded, nothing evaluated
    assert not ed.complete(run, specs, "m", data)
    assert len(calls) == 1 and loads == [1]


def test_complete_gives_a_run_without_tuning_its_first_tuning_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = {"refused": {}, "default": _variant(["msp"], []), "tuned": _variant([], [])}
    monkeypatch.setattr(
        ed,
        "evaluate_one",
        lambda *a: {
            "refused": {},
            "default": _variant(["ash"], []),
            "tuned": _variant(["ash"], ["ash"]),
            "seconds": {},
        },
    )
    assert ed.complete(run, {"msp": {}, "ash": {}}, "m", lambda: (None, None, None))
    assert run["tuned"]["tuning"] == {"protocol": {"select": "auroc"}, "detectors": {"ash": {}}}


def test_cost_step_measures_only_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = iter([[1.0], [2.0], [3.0], [4.0]])
    monkeypatch.setattr(ed.common, "loadavg", lambda: next(loads))
    asked: list[list[str]] = []

    def measure(specs: Any) -> dict[str, dict[str, float]]:
        asked.append(sorted(specs))
        out = {n: {"fit_ms_per_1k": 1.0, "score_ms_per_1k": 2.0} for n in specs}
        return {**out, "(backbone pass)": {"fit_ms_per_1k": 9.0, "score_ms_per_1k": 9.0}}

    path = tmp_path / "costs.json"
    first = ed.cost_step(path, {"msp": {}, "knn": {}}, measure)
    assert asked == [["knn", "msp"]] and first["load_average"] == {"before": [1.0], "after": [2.0]}
    assert json.loads(path.read_text()) == first
    second = ed.cost_step(path, {"msp": {}, "knn": {}, "core": {}}, measure)
    assert asked[-1] == ["core"]
    assert set(second["detectors"]) == {"msp", "knn", "core", "(backbone pass)"}
    assert second["load_average"] == {"before": [1.0], "after": [2.0]}  # the first measurement's
    assert second["added_later"] == [
        {"detectors": ["core"], "load_average": {"before": [3.0], "after": [4.0]}}
    ]
    assert ed.cost_step(path, {"msp": {}, "core": {}}, measure) == second and len(asked) == 2


class _Session:
    """Stands in for the evaluation session: refuses by the rules of ``refuse``."""

    runs: ClassVar[list[list[str]]] = []
    refuse: ClassVar[dict[str, Exception]] = {}

    def __init__(self, backbone: Any, protocol: Any) -> None:
        pass

    def run(self, dets: dict[str, Any], sets: Any, per_set: bool) -> None:
        _Session.runs.append(sorted(dets))
        for name, err in _Session.refuse.items():
            if name in dets:
                raise err


@pytest.mark.parametrize(
    ("refuse", "sessions"),
    [
        ({}, [["a", "b", "c"]]),
        # a refusal that names its detector: dropped, the others again together
        ({"b": ValueError("b: no dropout")}, [["a", "b", "c"], ["a", "c"]]),
        # one that does not: each alone
        ({"c": RuntimeError("shape mismatch")}, [["a", "b", "c"], ["a"], ["b"], ["c"]]),
    ],
)
def test_admitted_checks_together_first(
    monkeypatch: pytest.MonkeyPatch, refuse: dict[str, Exception], sessions: list[list[str]]
) -> None:
    import lightning_ood.session

    monkeypatch.setattr(lightning_ood.session, "EvaluationSession", _Session)
    monkeypatch.setattr(ed, "build", lambda specs: dict(specs))
    monkeypatch.setattr(_Session, "runs", [])
    monkeypatch.setattr(_Session, "refuse", refuse)
    ok, refused = ed.admitted({"a": {}, "b": {"k": 1}, "c": {}}, None, None)
    assert _Session.runs == sessions
    assert set(ok) == {"a", "b", "c"} - set(refuse)
    assert refused == {n: f"{type(e).__name__}: {e}" for n, e in refuse.items()}
    assert ok.get("b", {"k": 1}) == {"k": 1}


def test_spread_takes_evenly_spaced_indices() -> None:
    assert list(ed.spread(10, 3)) == [0, 3, 6]
    assert list(ed.spread(10, 20)) == list(range(10))  # fewer than asked: all
    assert list(ed.spread(100, 4)) == [0, 25, 50, 75]  # every quarter of a class-sorted set
