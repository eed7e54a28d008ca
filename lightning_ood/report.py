"""The one report module: table headers, Markdown/CSV/JSON writers, ROC and histogram figures.

The OOD callback and the grid both write through it, so their tables have the same columns,
the same headers (built from the metric conventions: direction and positive class of every
FPR) and the same number format (percent, two decimals, ``nan`` for a non-finite set).
Pure Python/torch (matplotlib imported lazily for figures); no Lightning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_ood.io import atomic_write_text
from lightning_ood.metrics import METRIC_CONVENTIONS, METRIC_NAMES
from lightning_ood.protocol import COUNT_KEYS

#: Metrics where lower is better; every other metric of ``METRIC_NAMES`` is higher-is-better.
LOWER_IS_BETTER = frozenset({"fpr95", "fpr80", "fpr95_oodpos"})

_SHORT = {
    "fpr95": "FPR95",
    "fpr80": "FPR80",
    "fpr95_oodpos": "FPR95",
    "auroc": "AUROC",
    "aupr_in": "AUPR-In",
    "aupr_out": "AUPR-Out",
    "detection_acc": "DetAcc",
}


def header(metric: str) -> str:
    """Column header of ``metric``: short name, direction, and the positive class of an FPR
    (read from ``METRIC_CONVENTIONS``), e.g. ``FPR95↓ (ID+)``."""
    if metric not in METRIC_CONVENTIONS:
        raise KeyError(f"unknown metric {metric!r}; known: {list(METRIC_CONVENTIONS)}")
    arrow = "↓" if metric in LOWER_IS_BETTER else "↑"
    positive = ""
    if metric.startswith("fpr"):
        positive = " (OOD+)" if "OOD positive" in METRIC_CONVENTIONS[metric] else " (ID+)"
    return f"{_SHORT.get(metric, metric)}{arrow}{positive}"


#: Table headers; every FPR names its positive class.
HEADERS: dict[str, str] = {m: header(m) for m in METRIC_NAMES}


def pct(value: float) -> str:
    """A metric in percent with two decimals; ``nan`` for a non-finite value."""
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def metrics_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Markdown rows ``| detector | OOD set | metrics... |`` of ``{detector: {set: values}}``.

    The ``average`` row is bold, and left out where a detector has a single OOD set (it would
    repeat that set's row).
    """
    lines = [
        "| detector | OOD set | " + " | ".join(HEADERS[m] for m in METRIC_NAMES) + " |",
        "|---|---|" + "---:|" * len(METRIC_NAMES),
    ]
    for dname, per_set in metrics.items():
        for ood, vals in per_set.items():
            if ood == "average" and len(per_set) == 2:
                continue
            label = f"**{ood}**" if ood == "average" else ood
            cells = " | ".join(pct(vals[m]) for m in METRIC_NAMES)
            lines.append(f"| {dname} | {label} | {cells} |")
    return lines


def format_markdown(results: Mapping[str, Any]) -> str:
    """The results of one evaluation (the callback's ``results``): title, convention, table."""
    lines = [
        f"### OOD detection: ID = {results['id_set']} ({results['data_version']}), "
        f"model = {results['model']}",
        "",
        "Values in %. " + results["convention"] + ".",
    ]
    validation = results.get("validation") or {}
    if validation.get("held_out_for"):
        lines.append(
            f"Layer ensembles {', '.join(validation['held_out_for'])} fit their combiner per "
            f"OOD set on {validation['held_out_per_set']} held-out samples of each set (seed "
            f"{validation.get('seed')}) and are reported on the rest; every other detector on "
            "all samples."
        )
    lines += ["", *metrics_table(results["metrics"])]
    return "\n".join(lines) + "\n"


def format_csv(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One row per (detector, set): fractions at full precision, then the sample counts."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["detector", "ood_set", *METRIC_NAMES, *COUNT_KEYS])
    for dname, per_set in metrics.items():
        for ood, vals in per_set.items():
            writer.writerow(
                [
                    dname,
                    ood,
                    *(vals[m] for m in METRIC_NAMES),
                    *(vals.get(k, "") for k in COUNT_KEYS),
                ]
            )
    return buf.getvalue()


def write_results(
    out_dir: str | os.PathLike[str],
    stem: str,
    results: Mapping[str, Any],
    markdown: str,
    metrics: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and (given ``metrics``) ``<stem>.csv`` atomically
    into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / f"{stem}.md": markdown,
        out / f"{stem}.json": json.dumps(results, indent=2, default=str),
    }
    if metrics is not None:
        files[out / f"{stem}.csv"] = format_csv(metrics)
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)


# -- figures --------------------------------------------------------------------------------------
def roc_figure(detector: str, per_set: Mapping[str, tuple[Tensor, Tensor]]) -> Any:
    """A matplotlib figure with one ROC curve (ID positive) per OOD set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_ood.metrics.functional import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for ood, (s_id, s_ood) in per_set.items():
        if len(s_id) and len(s_ood):
            fpr, tpr = roc_curve(s_id, s_ood)
            ax.plot(fpr.numpy(), tpr.numpy(), label=ood)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("FPR (OOD scored as ID)")
    ax.set_ylabel("TPR (ID kept)")
    ax.set_title(f"ROC, {detector} (ID positive)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_score_figures(
    writer: Any,
    scores: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    step: int,
    *,
    histograms: bool = True,
    roc: bool = True,
) -> None:
    """Log ID/OOD score histograms and ROC figures to a TensorBoard ``SummaryWriter``.

    Non-finite scores are left out of the figures (the tables report them).
    """
    import torch

    for dname, per_set in scores.items():
        finite = {o: (a[torch.isfinite(a)], b[torch.isfinite(b)]) for o, (a, b) in per_set.items()}
        if histograms and finite:
            first = next(iter(finite.values()))[0]
            if len(first):
                writer.add_histogram(f"ood_scores/{dname}/ID", first, step)
            for ood, (_, s_ood) in finite.items():
                if len(s_ood):
                    writer.add_histogram(f"ood_scores/{dname}/{ood}", s_ood, step)
        if roc:
            writer.add_figure(f"ood_roc/{dname}", roc_figure(dname, finite), step)


__all__ = [
    "HEADERS",
    "LOWER_IS_BETTER",
    "format_csv",
    "format_markdown",
    "header",
    "log_score_figures",
    "metrics_table",
    "pct",
    "roc_figure",
    "write_results",
]
