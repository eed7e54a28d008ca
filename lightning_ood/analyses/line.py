"""LINe paper analyses (Ahn et al. 2023): activated penultimate neurons per sample (Figure 1)
and class-specific neuron overlap (Table 8). Pure functions;
:class:`lightning_ood.session.EvaluationSession` calls them when a LINe detector is evaluated
(overlap) or when activated-neuron counts were asked for, so the generic callback and report
know nothing of them. The counts and overlaps themselves are
:func:`lightning_ood.detectors.line.activated_neuron_counts` and ``LINe.top_neuron_overlap``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_ood import report
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.line import LINe, activated_neuron_counts
from lightning_ood.io import atomic_write_text


def thresholds(detectors: Mapping[str, Detector], given: Sequence[float] | None) -> list[float]:
    """Activation thresholds of the neuron counts: ``given``, else 0 and the first LINe's δ
    (1 without a LINe), the two panels of Figure 1."""
    if given is not None:
        return [float(t) for t in given]
    lines = [d for d in detectors.values() if isinstance(d, LINe)]
    return [0.0, float(lines[0].delta) if lines else 1.0]


def counts(features: Tensor, at: Sequence[float]) -> Tensor:
    """(N, T) number of penultimate neurons above each threshold, per sample (Figure 1)."""
    return activated_neuron_counts(features, at).cpu()


def neuron_overlap(detectors: Mapping[str, Detector]) -> dict[str, Any]:
    """Table 8 of every fitted LINe detector: ``{name: top_neuron_overlap()}``."""
    return {
        n: d.top_neuron_overlap()
        for n, d in detectors.items()
        if isinstance(d, LINe) and d.is_fitted
    }


def results(
    detectors: Mapping[str, Detector],
    neuron_counts: Mapping[str, Tensor] | None = None,
    at: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The LINe entries of a results mapping: ``neuron_overlap`` (fitted LINe detectors) and
    ``activated_neurons`` (given counts per set, taken at thresholds ``at``)."""
    out: dict[str, Any] = {}
    overlap = neuron_overlap(detectors)
    if overlap:
        out["neuron_overlap"] = overlap
    if neuron_counts:
        out["activated_neurons"] = activated_neurons_summary(neuron_counts, list(at or ()))
    return out


def markdown(results_: Mapping[str, Any]) -> list[str]:
    """Table 8 of a results mapping (empty without a LINe detector)."""
    overlap = results_.get("neuron_overlap")
    return [format_neuron_overlap(overlap).rstrip("\n")] if overlap else []


def write(
    out_dir: str | os.PathLike[str] | None,
    writer: Any,
    step: int,
    results_: Mapping[str, Any],
    neuron_counts: Mapping[str, Tensor] | None = None,
    at: Sequence[float] | None = None,
    num_features: int = 0,
) -> list[Path]:
    """Figure 1 (``figures/activated_neurons.png`` and TensorBoard) and Table 8
    (``neuron_overlap.{md,json,csv}``) of one evaluation; returns the files written."""
    paths: list[Path] = []
    if neuron_counts:
        png = log_activated_neurons(
            writer,
            neuron_counts,
            list(at or ()),
            num_features,
            step,
            out_dir=None if out_dir is None else Path(out_dir) / "figures",
        )
        paths += [png] if png is not None else []
    overlap = results_.get("neuron_overlap")
    if overlap and out_dir is not None:
        paths += report.write_results(
            out_dir, "neuron_overlap", {"neuron_overlap": overlap}, format_neuron_overlap(overlap)
        )
        csv_path = Path(out_dir) / "neuron_overlap.csv"
        atomic_write_text(csv_path, format_neuron_overlap_csv(overlap))
        paths.append(csv_path)
    return paths


def _threshold_label(t: float) -> str:
    return f"h > {t:g}"


def activated_neurons_figure(
    counts: Mapping[str, Tensor], thresholds: Sequence[float], num_features: int
) -> Any:
    """LINe Figure 1: histograms of the number of penultimate neurons with h > t per sample.

    One panel per (threshold, OOD set), each overlaying the ID set (the first entry of
    ``counts``) and that OOD set; bar heights are fractions of each set's samples, on
    integer bins 0..q.

    Args:
        counts: set name -> (N, T) counts from ``activated_neuron_counts`` (ID first).
        thresholds: the T thresholds the counts were taken at (labels only).
        num_features: q, the width of the penultimate layer.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not counts:
        raise ValueError("activated_neurons_figure: counts is empty; pass {ID set: counts, ...}")
    names = list(counts)
    id_name, ood_names = names[0], names[1:] or [None]
    bins = np.arange(num_features + 2) - 0.5
    rows, cols = len(thresholds), len(ood_names)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, constrained_layout=True
    )
    for r, t in enumerate(thresholds):
        for c, ood in enumerate(ood_names):
            ax = axes[r][c]
            for name, color in ((id_name, "tab:blue"), (ood, "tab:orange")):
                if name is None or len(counts[name]) == 0:
                    continue
                v = counts[name][:, r].cpu().numpy()
                weights = np.full(v.shape, 1.0 / len(v))
                ax.hist(v, bins=bins, weights=weights, color=color, alpha=0.55, label=name)
            shown = [counts[n][:, r] for n in (id_name, ood) if n is not None and len(counts[n])]
            if shown:
                lo, hi = int(min(s.min() for s in shown)), int(max(s.max() for s in shown))
                pad = max(1, (hi - lo) // 20)
                ax.set_xlim(lo - pad - 0.5, hi + pad + 0.5)
            ax.set_title(f"{id_name} vs {ood}" if ood else id_name, fontsize=8)
            ax.set_xlabel(f"# neurons with {_threshold_label(t)} (of {num_features})", fontsize=7)
            ax.set_ylabel("fraction of samples", fontsize=7)
            ax.legend(fontsize=6)
    return fig


def activated_neurons_summary(
    counts: Mapping[str, Tensor], thresholds: Sequence[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, median and sample count of the activated-neuron counts, per set and threshold
    (for the results JSON): ``{set: {"h > t": {"mean", "median", "n"}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, c in counts.items():
        per: dict[str, dict[str, float]] = {}
        for r, t in enumerate(thresholds):
            v = c[:, r].double()
            empty = v.numel() == 0
            per[_threshold_label(t)] = {
                "mean": math.nan if empty else float(v.mean()),
                "median": math.nan if empty else float(v.median()),
                "n": int(v.numel()),
            }
        out[name] = per
    return out


def log_activated_neurons(
    writer: Any,
    counts: Mapping[str, Tensor],
    thresholds: Sequence[float],
    num_features: int,
    step: int,
    out_dir: str | os.PathLike[str] | None = None,
    stem: str = "activated_neurons",
) -> Path | None:
    """Draw :func:`activated_neurons_figure`, save it as ``<out_dir>/<stem>.png`` (atomic)
    and log it (plus one histogram per set and threshold) to a TensorBoard ``SummaryWriter``.

    ``writer`` or ``out_dir`` may be None to skip that output. Returns the PNG path or None.
    """
    import matplotlib.pyplot as plt

    fig = activated_neurons_figure(counts, thresholds, num_features)
    path = None
    if out_dir is not None:
        path = report.save_figure(fig, Path(out_dir) / f"{stem}.png")
    if writer is not None:
        for name, c in counts.items():
            for r, t in enumerate(thresholds):
                if len(c):
                    writer.add_histogram(f"ood_activated_neurons/{name}/gt_{t:g}", c[:, r], step)
        writer.add_figure("ood_activated_neurons", fig, step)  # closes the figure
    else:
        plt.close(fig)
    return path


def _overlap_cell(row: Mapping[str, Any]) -> str:
    return f"{row['percent']:.2f} ({row['neurons']})"


def format_neuron_overlap(overlaps: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of LINe Table 8 for one or more fitted LINe detectors.

    ``overlaps``: detector (or model/ID-set) name -> ``LINe.top_neuron_overlap()`` result. All
    entries must use the same o values. Cells: percent of the q neurons (neuron count).
    """
    if not overlaps:
        raise ValueError("format_neuron_overlap: no overlap result given")
    first = next(iter(overlaps.values()))
    os_ = [row["o"] for row in first["rows"]]
    for name, res in overlaps.items():
        if [row["o"] for row in res["rows"]] != os_:
            raise ValueError(
                f"format_neuron_overlap: {name!r} has o values "
                f"{[row['o'] for row in res['rows']]}, the first entry {os_}; use the same ones"
            )
    word = "at least" if first["rule"] == "at_least" else "more than"
    lines = [
        f"Class-specific neurons (LINe Table 8): % of the q penultimate neurons (count) that are "
        f"in the top {first['top_percent']:g} % by contribution of {word} o % of the L classes.",
        "",
        "| detector | L | q | " + " | ".join(f"o = {o:g}" for o in os_) + " |",
        "|---|---:|---:|" + "---:|" * len(os_),
    ]
    for name, res in overlaps.items():
        cells = " | ".join(_overlap_cell(row) for row in res["rows"])
        lines.append(f"| {name} | {res['num_classes']} | {res['num_features']} | {cells} |")
    return "\n".join(lines) + "\n"


def format_neuron_overlap_csv(overlaps: Mapping[str, Mapping[str, Any]]) -> str:
    """One CSV row per (detector, o), full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["detector", "num_classes", "num_features", "top_percent", "rule", "o", "min_classes",
         "neurons", "percent"]
    )  # fmt: skip
    for name, res in overlaps.items():
        for row in res["rows"]:
            writer.writerow(
                [name, res["num_classes"], res["num_features"], res["top_percent"], res["rule"],
                 row["o"], row["min_classes"], row["neurons"], row["percent"]]
            )  # fmt: skip
    return buf.getvalue()


__all__ = [
    "activated_neurons_figure",
    "activated_neurons_summary",
    "counts",
    "format_neuron_overlap",
    "format_neuron_overlap_csv",
    "log_activated_neurons",
    "markdown",
    "neuron_overlap",
    "results",
    "thresholds",
    "write",
]
