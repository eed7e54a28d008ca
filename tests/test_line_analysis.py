"""LINe analyses: activated-neuron counts and figure (paper Figure 1), class-specific neuron
overlap and its tables (paper Table 8), on hand-built cases."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.analyses import line as line_analyses
from lightning_ood.detectors.line import LINe, activated_neuron_counts, top_neuron_overlap


# -- Figure 1: activated neurons ----------------------------------------------------------------
def test_activated_neuron_counts_by_hand() -> None:
    h = torch.tensor([[0.0, 0.5, 2.0, -1.0, 1.0], [1.5, 0.0, 0.0, 3.0, 0.2]])
    counts = activated_neuron_counts(h, thresholds=(0.0, 1.0))
    # Strictly above: 0.0 is not active at t = 0, 1.0 is not above t = 1.
    assert counts.tolist() == [[3, 1], [3, 2]]
    assert counts.dtype == torch.int64
    assert activated_neuron_counts(h).tolist() == [[3], [3]]  # default: h > 0 only
    with pytest.raises(ValueError, match="thresholds"):
        activated_neuron_counts(h, thresholds=())
    with pytest.raises(ValueError, match=r"\(N, q\)"):
        activated_neuron_counts(h[0])


class FakeWriter:
    """Records what a TensorBoard SummaryWriter would receive."""

    def __init__(self) -> None:
        self.histograms: dict[str, list[float]] = {}
        self.figures: list[tuple[str, Any, int]] = []

    def add_histogram(self, tag: str, values: Tensor, step: int) -> None:
        self.histograms[tag] = values.tolist()

    def add_figure(self, tag: str, fig: Any, step: int) -> None:
        self.figures.append((tag, fig, step))


def toy_counts() -> dict[str, Tensor]:
    # q = 6; ID counts at t = 0: [5, 5, 4, 6] and at t = 1: [2, 1, 1, 3].
    id_h = torch.tensor(
        [
            [0.1, 2.0, 3.0, 0.5, 0.2, 0.0],
            [0.3, 0.4, 1.5, 0.5, 0.2, 0.0],
            [0.0, 0.4, 1.5, 0.5, 0.0, 0.3],
            [0.1, 2.0, 3.0, 0.5, 0.2, 1.1],
        ]
    )
    ood_a = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.5, 0.0, 0.0]])
    ood_b = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    return {name: activated_neuron_counts(h, (0.0, 1.0)) for name, h in
            (("cifar10", id_h), ("svhn", ood_a), ("noise", ood_b))}  # fmt: skip


def test_activated_neurons_figure_panels_and_bar_heights() -> None:
    counts = toy_counts()
    assert counts["cifar10"].tolist() == [[5, 2], [5, 1], [4, 1], [6, 3]]
    fig = line_analyses.activated_neurons_figure(counts, (0.0, 1.0), num_features=6)
    axes = fig.axes
    assert len(axes) == 4  # 2 thresholds x 2 OOD sets, ID overlaid in every panel
    assert [ax.get_title() for ax in axes] == [
        "cifar10 vs svhn", "cifar10 vs noise", "cifar10 vs svhn", "cifar10 vs noise"
    ]  # fmt: skip
    # Panel (t = 0, svhn): 7 integer bins 0..6 per set, heights = fraction of that set.
    bars = axes[0].patches
    assert len(bars) == 14
    id_heights = [b.get_height() for b in bars[:7]]
    ood_heights = [b.get_height() for b in bars[7:]]
    np.testing.assert_allclose(id_heights, [0, 0, 0, 0, 0.25, 0.5, 0.25])
    np.testing.assert_allclose(ood_heights, [0, 0.5, 0.5, 0, 0, 0, 0])
    assert [b.get_x() + b.get_width() / 2 for b in bars[:7]] == [0, 1, 2, 3, 4, 5, 6]
    # Panel (t = 1, noise): ID [2, 1, 1, 3] -> bins 1: .5, 2: .25, 3: .25; noise all at 0.
    bars = axes[3].patches
    np.testing.assert_allclose([b.get_height() for b in bars[:7]], [0, 0.5, 0.25, 0.25, 0, 0, 0])
    np.testing.assert_allclose([b.get_height() for b in bars[7:]], [1, 0, 0, 0, 0, 0, 0])
    assert "h > 1" in axes[3].get_xlabel()


def test_log_activated_neurons_writes_png_and_tensorboard(tmp_path: Path) -> None:
    counts = toy_counts()
    writer = FakeWriter()
    path = line_analyses.log_activated_neurons(
        writer, counts, (0.0, 1.0), 6, step=3, out_dir=tmp_path
    )
    assert path == tmp_path / "activated_neurons.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(tag, step) for tag, _, step in writer.figures] == [("ood_activated_neurons", 3)]
    assert writer.histograms["ood_activated_neurons/cifar10/gt_0"] == [5, 5, 4, 6]
    assert writer.histograms["ood_activated_neurons/svhn/gt_1"] == [0, 1]
    assert len(writer.histograms) == 6
    # Without a writer, only the PNG; without out_dir, nothing on disk.
    assert (
        line_analyses.log_activated_neurons(None, counts, (0.0, 1.0), 6, 0, tmp_path, "b")
        is not None
    )
    assert line_analyses.log_activated_neurons(FakeWriter(), counts, (0.0, 1.0), 6, 0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["activated_neurons.png", "b.png"]


def test_activated_neurons_summary_values() -> None:
    summary = line_analyses.activated_neurons_summary(toy_counts(), (0.0, 1.0))
    assert summary["cifar10"]["h > 0"] == {"mean": 5.0, "median": 5.0, "n": 4}
    assert summary["cifar10"]["h > 1"]["mean"] == 1.75
    assert summary["svhn"]["h > 0"]["mean"] == 1.5
    assert summary["noise"]["h > 1"] == {"mean": 0.0, "median": 0.0, "n": 1}


# -- Table 8: class-specific neuron overlap -------------------------------------------------------
#: q = 10 neurons, L = 5 classes; each class has two large contributions (10 and 9) on the
#: neurons below and distinct small ones elsewhere, so the top-20 % are exactly these pairs.
TOP_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (0, 4)]


def hand_contributions() -> Tensor:
    c = torch.empty(10, 5, dtype=torch.float64)
    for k, (i, j) in enumerate(TOP_PAIRS):
        c[:, k] = torch.linspace(-1.0, 1.0, 10) + 0.01 * k
        c[i, k], c[j, k] = 10.0, 9.0
    return c


@pytest.mark.parametrize(
    ("inclusive", "expected"),
    [
        # Classes per neuron n = [4, 2, 2, 1, 1, 0, 0, 0, 0, 0] (neuron 0 in classes 0, 1, 2, 4).
        # o·L/100 = 1, 1.5, 2.5, 4 for o = 20, 30, 50, 80.
        (True, {20.0: (1, 5), 30.0: (2, 3), 50.0: (3, 1), 80.0: (4, 1)}),  # n >= o·L/100
        (False, {20.0: (2, 3), 30.0: (2, 3), 50.0: (3, 1), 80.0: (5, 0)}),  # n > o·L/100
    ],
)
def test_top_neuron_overlap_by_hand(inclusive: bool, expected: dict) -> None:
    res = top_neuron_overlap(hand_contributions(), 20.0, tuple(expected), inclusive=inclusive)
    assert res["num_features"] == 10 and res["num_classes"] == 5
    assert res["neurons_per_class"] == [2, 2, 2, 2, 2]
    assert res["class_count_histogram"] == [5, 2, 2, 0, 1, 0]
    assert res["rule"] == ("at_least" if inclusive else "more_than")
    got = {r["o"]: (r["min_classes"], r["neurons"]) for r in res["rows"]}
    assert got == expected
    assert [r["percent"] for r in res["rows"]] == [10.0 * n for _, n in expected.values()]


def test_top_neuron_overlap_paper_thresholds_on_cifar_shapes() -> None:
    """q = 342, L = 10, top 10 %: 35 neurons per class (the same rule as LINe's p_a = 90
    masks); o = 20 / 30 count neurons top for >= 2 / >= 3 classes (inclusive)."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(342, 10, generator=g, dtype=torch.float64)
    res = top_neuron_overlap(c)
    assert res["neurons_per_class"] == [35] * 10
    assert [r["min_classes"] for r in res["rows"]] == [1, 2, 3, 5]
    n = torch.zeros(342, dtype=torch.long)
    for k in range(10):
        n[c[:, k].topk(35).indices] += 1
    for row in res["rows"]:
        count = int((n >= row["min_classes"]).sum())
        assert row["neurons"] == count
        assert math.isclose(row["percent"], 100.0 * count / 342)
    strict = top_neuron_overlap(c, inclusive=False)
    assert [r["min_classes"] for r in strict["rows"]] == [2, 3, 4, 6]


def test_fitted_line_overlap_uses_its_contribution_matrix() -> None:
    # The LINe toy of test_line.py: C = [[2, 0], [2, -4], [-1, 6], [1, 2]]; top 50 % by the
    # strict percentile rule: class 0 -> neurons {0, 1}, class 1 -> {2, 3}.
    w = torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, -4.0, 2.0, 1.0]], dtype=torch.float64)
    model = LinearHeadNet(w, torch.tensor([0.1, -0.2], dtype=torch.float64))
    train = [(torch.tensor([[2.0, 1.0, 1.0, 2.0], [0.0, 1.0, 3.0, 2.0]], dtype=torch.float64),
              torch.tensor([0, 1]))]  # fmt: skip
    det = LINe(delta=2.5, p_a=50.0, p_w=50.0)
    with pytest.raises(RuntimeError, match="not fitted"):
        det.top_neuron_overlap()
    engine.fit_from_loader([det], model, train)
    res = det.top_neuron_overlap(top_percent=50.0, class_percents=(50.0, 100.0))
    assert res["class_count_histogram"] == [0, 4, 0]
    assert [(r["neurons"], r["percent"]) for r in res["rows"]] == [(4, 100.0), (0, 0.0)]
    assert det.top_neuron_overlap(50.0, (50.0,), inclusive=False)["rows"][0]["neurons"] == 0


def test_top_neuron_overlap_bad_arguments_name_the_parameter() -> None:
    c = hand_contributions()
    with pytest.raises(ValueError, match="top_percent"):
        top_neuron_overlap(c, top_percent=0.0)
    with pytest.raises(ValueError, match="class_percents"):
        top_neuron_overlap(c, class_percents=(120.0,))
    with pytest.raises(ValueError, match="fit the LINe detector"):
        top_neuron_overlap(torch.zeros(0))


def test_overlap_markdown_and_csv() -> None:
    res = top_neuron_overlap(hand_contributions(), 20.0, (20.0, 30.0, 50.0))
    md = line_analyses.format_neuron_overlap({"line": res, "line_abs": res})
    lines = md.splitlines()
    assert "top 20 %" in lines[0] and "at least o %" in lines[0]
    assert lines[2] == "| detector | L | q | o = 20 | o = 30 | o = 50 |"
    assert lines[4] == "| line | 5 | 10 | 50.00 (5) | 30.00 (3) | 10.00 (1) |"
    assert len(lines) == 6
    rows = list(csv.DictReader(io.StringIO(line_analyses.format_neuron_overlap_csv({"line": res}))))
    assert [(float(r["o"]), int(r["neurons"]), float(r["percent"])) for r in rows] == [
        (20.0, 5, 50.0), (30.0, 3, 30.0), (50.0, 1, 10.0)
    ]  # fmt: skip
    assert {r["rule"] for r in rows} == {"at_least"}
    other = top_neuron_overlap(hand_contributions(), 20.0, (20.0,))
    with pytest.raises(ValueError, match="same ones"):
        line_analyses.format_neuron_overlap({"a": res, "b": other})
