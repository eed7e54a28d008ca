"""analyses.fssd.robustness_summary: FSSD Figure 5's aggregation of per-severity runs."""

from __future__ import annotations

import pytest

from lightning_ood.analyses import fssd


def _run(aurocs: dict[str, float]) -> dict:
    return {
        "metrics": {d: {"mnist": {"auroc": a}, "kmnist": {"auroc": 0.0}} for d, a in aurocs.items()}
    }


def test_robustness_summary_by_hand() -> None:
    runs = [
        (0, _run({"msp": 0.8, "fssd": 0.99})),
        (0, _run({"msp": 0.6, "fssd": 0.97})),
        (3, _run({"msp": 0.5, "fssd": 0.9})),
        (3, _run({"msp": 0.7, "fssd": 0.8})),
        (3, _run({"msp": 0.9})),
    ]
    got = fssd.robustness_summary(runs, "mnist")
    assert list(got) == ["msp", "fssd"]
    assert list(got["msp"]) == ["0", "3"]
    # msp, severity 3: values 0.5, 0.7, 0.9 -> mean 0.7, numpy linear quartiles 0.6 / 0.8
    s3 = got["msp"]["3"]
    assert s3["n"] == 3
    assert s3["mean"] == pytest.approx(0.7)
    assert (s3["q1"], s3["median"], s3["q3"]) == pytest.approx((0.6, 0.7, 0.8))
    assert (s3["min"], s3["max"]) == pytest.approx((0.5, 0.9))
    # msp, clean: 0.8, 0.6 -> mean 0.7, Q1 0.65, Q3 0.75
    assert got["msp"]["0"]["mean"] == pytest.approx(0.7)
    assert (got["msp"]["0"]["q1"], got["msp"]["0"]["q3"]) == pytest.approx((0.65, 0.75))
    # fssd is missing from one severity-3 run: two values, 0.9 and 0.8
    assert got["fssd"]["3"]["n"] == 2
    assert got["fssd"]["3"]["mean"] == pytest.approx(0.85)
    # other metrics and sets are ignored; the table helper reads it like a severity summary
    lines = fssd.severity_lines(got, "auroc", pooled="runs (seeds)")
    assert "| msp | 70.00 [65.00, 75.00] | 70.00 [60.00, 80.00] |" in lines
    assert lines[0] == "AUROC↑ per corruption severity: mean [Q1, Q3] over 3 runs (seeds)."
    # ... and the figure: one line per detector through the means, titled by what it pools
    fig = fssd.severity_figure(got, "auroc", pooled="seeds")
    ax = fig.axes[0]
    assert ax.get_title().endswith("(band: Q1-Q3 over seeds)")
    msp = next(line for line in ax.get_lines() if line.get_label() == "msp")
    assert list(msp.get_xdata()) == [0, 3]
    assert list(msp.get_ydata()) == pytest.approx([70.0, 70.0])


def test_robustness_summary_errors() -> None:
    with pytest.raises(ValueError, match="no run reports OOD set 'svhn'"):
        fssd.robustness_summary([(1, _run({"msp": 0.5}))], "svhn")
    with pytest.raises(ValueError, match="severity must be >= 0"):
        fssd.robustness_summary([(-1, _run({"msp": 0.5}))], "mnist")
