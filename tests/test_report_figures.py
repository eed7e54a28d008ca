"""The paper pictures (lightning_ood.report) and the corruption-severity summary
(lightning_ood.analyses.fssd)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_ood import report
from lightning_ood.analyses import fssd


def test_severity_of_parses_only_corrupted_set_names() -> None:
    assert fssd.severity_of("fmnist_c/gaussian_noise/3") == ("fmnist_c", "gaussian_noise", 3)
    assert fssd.severity_of("mnist") is None
    assert fssd.severity_of("a/b/c") is None


def test_severity_summary_by_hand() -> None:
    metrics = {
        "fssd": {
            "c/fog/1": {"auroc": 0.6},
            "c/snow/1": {"auroc": 0.8},
            "c/blur/1": {"auroc": 0.7},
            "c/fog/2": {"auroc": 0.9},
            "mnist": {"auroc": 0.1},  # not a corrupted set: ignored
            "average": {"auroc": 0.5},
        },
        "msp": {"mnist": {"auroc": 0.4}},  # no corrupted set at all: left out
    }
    got = fssd.severity_summary(metrics, "auroc")
    assert set(got) == {"fssd"}
    one = got["fssd"]["1"]
    assert one["mean"] == pytest.approx(0.7) and one["n"] == 3
    # numpy's linear quartiles of [0.6, 0.7, 0.8]
    assert one["q1"] == pytest.approx(0.65) and one["q3"] == pytest.approx(0.75)
    assert (one["min"], one["median"], one["max"]) == pytest.approx((0.6, 0.7, 0.8))
    assert got["fssd"]["2"] == {
        "mean": 0.9, "q1": 0.9, "median": 0.9, "q3": 0.9, "min": 0.9, "max": 0.9, "n": 1,
    }  # fmt: skip
    lines = fssd.severity_lines(got, "auroc")
    assert lines[-1] == "| fssd | 70.00 [65.00, 75.00] | 90.00 [90.00, 90.00] |"


def test_density_figure_shares_one_axis_and_marks_the_threshold() -> None:
    g = torch.Generator().manual_seed(0)
    s_id = torch.randn(500, generator=g, dtype=torch.float64) + 2
    s_a = torch.randn(300, generator=g, dtype=torch.float64)
    s_b = torch.cat(
        [torch.randn(300, generator=g, dtype=torch.float64) - 1, torch.tensor([np.nan])]
    )
    fig = report.density_figure("det", {"a": (s_id, s_a), "b": (s_id, s_b)}, threshold=0.5)
    ax = fig.axes[0]
    labels = [p.get_label() for p in ax.patches]
    assert labels == ["ID", "a", "b"]
    # one set of bins for all three: every step outline spans the same x-range
    spans = {
        (round(p.get_xy()[:, 0].min(), 9), round(p.get_xy()[:, 0].max(), 9)) for p in ax.patches
    }
    finite = torch.cat([s_id, s_a, s_b[:-1]])
    assert spans == {(round(float(finite.min()), 9), round(float(finite.max()), 9))}
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.5, 0.5]
    import matplotlib.pyplot as plt

    plt.close(fig)


class FakeWriter:
    def __init__(self) -> None:
        self.tags: list[str] = []

    def add_figure(self, tag: str, fig: Any, step: int) -> None:
        import matplotlib.pyplot as plt

        self.tags.append(tag)
        plt.close(fig)


def test_write_figures_writes_pngs_and_logs_every_picture(tmp_path: Path) -> None:
    s = torch.linspace(0, 1, 50, dtype=torch.float64)
    scores = {"msp": {"c/fog/1": (s, s - 0.5)}, "fssd": {"c/fog/1": (s, s - 0.2)}}
    comps = {"ID": torch.rand(50, 2), "c/fog/1": torch.rand(40, 2)}
    severity = fssd.severity_summary({"msp": {"c/fog/1": {"auroc": 0.7}}}, "auroc")
    writer = FakeWriter()
    extra = fssd.figure_makers({"fssd": (("l1", "l2"), comps)}, severity)
    paths = report.write_figures(tmp_path, writer, 3, scores, {"msp": 0.5}, extra)
    names = sorted(p.name for p in paths)
    assert names == ["density_fssd.png", "density_msp.png", "layers_fssd.png", "severity_auroc.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert writer.tags == [
        "ood_density/msp",
        "ood_density/fssd",
        "ood_layers/fssd",
        "ood_severity/auroc",
    ]
