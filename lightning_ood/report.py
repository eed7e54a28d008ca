"""The one report module: table headers, Markdown/CSV/JSON writers, ROC and histogram figures.

Generic only: the paper-specific analyses (LINe Figure 1/Table 8, FSSD per-layer and severity
figures) live in :mod:`lightning_ood.analyses`, whose Markdown this module appends to a
results table when the results hold them. The evaluation session, the OOD callback and the
grid all write through it, so their tables have the same columns,
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ood.io import atomic_write_text
from lightning_ood.metrics import (
    CCR_FPRS,
    CCR_NAMES,
    LOWER_IS_BETTER,
    METRIC_CONVENTIONS,
    METRIC_NAMES,
)
from lightning_ood.protocol import COUNT_KEYS, PER_SET, is_average_row

#: Metrics where lower is better; every other metric of ``METRIC_NAMES`` is higher-is-better.

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
            label = f"**{ood}**" if is_average_row(ood) else ood
            cells = " | ".join(pct(vals[m]) for m in METRIC_NAMES)
            lines.append(f"| {dname} | {label} | {cells} |")
    return lines


#: CCR@FPR column headers: the FPR budget, higher is better.
CCR_HEADERS: dict[str, str] = {n: f"CCR@{t:g}↑" for n, t in zip(CCR_NAMES, CCR_FPRS, strict=True)}


def ccr_table(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Markdown rows ``| detector | OOD set | CCR@1e-4 ... CCR@0.1 |`` of the rows that hold
    CCR@FPR (``[]`` when none does); same row rules as :func:`metrics_table`."""
    lines: list[str] = []
    for dname, per_set in metrics.items():
        for ood, vals in per_set.items():
            if not all(n in vals for n in CCR_NAMES):
                continue
            if ood == "average" and len(per_set) == 2:
                continue
            label = f"**{ood}**" if is_average_row(ood) else ood
            cells = " | ".join(pct(vals[n]) for n in CCR_NAMES)
            lines.append(f"| {dname} | {label} | {cells} |")
    if not lines:
        return []
    head = "| detector | OOD set | " + " | ".join(CCR_HEADERS[n] for n in CCR_NAMES) + " |"
    return [head, "|---|---|" + "---:|" * len(CCR_NAMES), *lines]


def ccr_lines(results: Mapping[str, Any]) -> list[str]:
    """The CCR@FPR section of a results table: how it is read and the compact table, or the
    note saying why it was left out; ``[]`` for results without a ``ccr`` record."""
    rec = results.get("ccr")
    if not isinstance(rec, Mapping):
        return []
    if "omitted" in rec:
        return [f"CCR@FPR (open-set accuracy) is left out: {rec['omitted']}."]
    table = ccr_table(results["metrics"])
    if not table:
        return []
    first = (rec.get("conventions") or {}).get(CCR_NAMES[0], "")
    return [
        f"CCR@FPR in % (OpenOOD's open-set accuracy, method `{rec.get('method')}`): "
        f"{first.replace(f'{CCR_FPRS[0]:g}', 'r')}, for r = "
        + ", ".join(f"{t:g}" for t in CCR_FPRS)
        + ".",
        "",
        *table,
    ]


def group_lines(results: Mapping[str, Any]) -> list[str]:
    """Which OOD sets each ``average[group]`` row averages, and the sets left out."""
    lines: list[str] = []
    members: dict[str, list[str]] = {}
    for ood, group in (results.get("groups") or {}).items():
        members.setdefault(group, []).append(ood)
    if members:
        lines.append(
            "Group rows `average[<group>]` are the plain mean over the group's sets: "
            + "; ".join(f"{g}: {', '.join(sets)}" for g, sets in members.items())
            + "."
        )
    skipped = results.get("skipped_ood_sets") or {}
    if skipped:
        lines.append(
            "Declared OOD sets left out (missing: skip), so their groups average fewer sets: "
            + "; ".join(f"{n} ({why})" for n, why in skipped.items())
            + "."
        )
    return lines


def format_markdown(results: Mapping[str, Any]) -> str:
    """The results of one evaluation (the callback's ``results``): title, convention, table."""
    lines = [
        f"### OOD detection: ID = {results['id_set']} ({results['data_version']}), "
        f"model = {results['model']}",
        "",
        "Values in %. " + results["convention"] + ".",
    ]
    lines.append(
        "A row named after a detector is the detector as it ships (`lightning_ood.load()` "
        "returns these scores), on every sample."
    )
    for name, rec in (results.get("shipped_combiners") or {}).items():
        id_part = f"{rec.get('n_id')} ID ({rec.get('id_data', 'validation')})"
        if rec.get("method") == "logistic":
            ood = ", ".join(rec.get("ood_sets") or [])
            what = f"a logistic regression on {id_part} + {rec.get('n_ood')} validation OOD ({ood})"
        elif rec.get("method") == "logistic_fgsm_proxy":
            what = (
                f"a logistic regression on {id_part} vs their FGSM-perturbed copies (proxy "
                "outliers; no OOD data was given)"
            )
        else:
            what = f"the mean of its components z-scored on {id_part}; no OOD data"
        lines.append(f"`{name}` ships its layer combiner fitted as {what}.")
    validation = results.get("validation") or {}
    if validation.get("held_out_for"):
        rows = ", ".join(f"`{n}{PER_SET}`" for n in validation["held_out_for"])
        lines.append(
            f"Rows {rows} are the papers' protocol, not a shipped detector: a combiner fitted "
            f"per OOD set on {validation['held_out_per_set']} held-out samples of each test set "
            f"(seed {validation.get('seed')}), reported on the rest."
        )
    lines += group_lines(results)
    lines += ["", *metrics_table(results["metrics"])]
    ccr = ccr_lines(results)
    if ccr:
        lines += ["", *ccr]
    if results.get("tuning"):
        lines += ["", *tuning_lines(results["tuning"])]
    from lightning_ood.analyses import fssd, line  # they import this module

    for part in (fssd.markdown(results), line.markdown(results)):
        if part:
            lines += ["", *part]
    return "\n".join(lines) + "\n"


def tuning_lines(tuning: Mapping[str, Any]) -> list[str]:
    """Which hyperparameters ``tune`` selected, from what, and on which data."""
    proto = tuning["protocol"]
    sel = proto["select"]
    val_sets = ", ".join(f"{n} ({k} samples)" for n, k in proto["val_ood_sets"].items())
    lines = [
        f"Hyperparameters selected by validation {HEADERS.get(sel, sel)} (mean over validation "
        f"OOD sets {val_sets}; ID: {proto['id_validation']}); none of these samples is "
        "reported above.",
        "",
        f"| detector | selected | candidates | val {HEADERS.get(sel, sel)} |",
        "|---|---|---:|---:|",
    ]
    for name, t in tuning["detectors"].items():
        if "skipped" in t:
            lines.append(f"| {name} | not tuned: {t['skipped']} | 0 | |")
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in t["selected"].items())
        lines.append(
            f"| {name} | {chosen} | {len(t['rows'])} | {pct(t['val_mean'].get(sel, math.nan))} |"
        )
    return lines


def format_csv(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One row per (detector, set or average row): fractions at full precision, CCR@FPR
    (empty where it was not computed: no labels), then the sample counts."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["detector", "ood_set", *METRIC_NAMES, *CCR_NAMES, *COUNT_KEYS])
    for dname, per_set in metrics.items():
        for ood, vals in per_set.items():
            writer.writerow(
                [
                    dname,
                    ood,
                    *(vals[m] for m in METRIC_NAMES),
                    *(vals.get(k, "") for k in CCR_NAMES),
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


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG atomically (no half-written image); the figure stays open."""
    from lightning_ood.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _figure_name(name: str) -> str:
    """A file-name-safe form of a name (``fmnist_c/fog/2`` -> ``fmnist_c-fog-2``)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def shared_bins(arrays: Sequence[Tensor], bins: int = 60) -> Any:
    import numpy as np

    finite = [a[torch.isfinite(a)].double().numpy() for a in arrays if len(a)]
    finite = [a for a in finite if a.size]
    if not finite:
        return None
    lo, hi = min(a.min() for a in finite), max(a.max() for a in finite)
    if hi <= lo:
        hi = lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def density_figure(
    detector: str, per_set: Mapping[str, tuple[Tensor, Tensor]], threshold: float | None = None
) -> Any:
    """ID and every OOD set as overlaid score densities on ONE shared axis (the picture the
    papers show), with the calibrated decision threshold marked. Non-finite scores are left
    out (the tables count them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sets = list(per_set.items())
    s_id = sets[0][1][0] if sets else torch.zeros(0)
    bins = shared_bins([s_id, *(b for _, (_, b) in sets)])
    if bins is not None:
        for label, s in [("ID", s_id), *((o, b) for o, (_, b) in sets)]:
            s = s[torch.isfinite(s)].double().numpy()
            if s.size:
                ax.hist(s, bins=bins, density=True, histtype="step", lw=1.4, label=label)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("score (higher = more in-distribution)")
    ax.set_ylabel("density")
    ax.set_title(f"{detector}: score densities")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_figures(
    out_dir: str | os.PathLike[str] | None,
    writer: Any,
    step: int,
    evaluation_scores: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    thresholds: Mapping[str, float],
    extra: Mapping[str, Callable[[], Any]] | None = None,
) -> list[Path]:
    """The pictures of one evaluation, as PNGs in ``<out_dir>/figures`` and, given a
    TensorBoard ``writer``, as figures: overlaid score densities with the threshold for every
    detector, then ``extra`` (``{tag: figure maker}``, e.g. the analyses' paper figures:
    :func:`lightning_ood.analyses.fssd.figure_makers`)."""
    import matplotlib.pyplot as plt

    makers: dict[str, Callable[[], Any]] = {}  # built one at a time: open figures cost memory
    for det, per_set in evaluation_scores.items():
        makers[f"ood_density/{det}"] = lambda d=det, p=per_set: density_figure(
            d, p, thresholds.get(d)
        )
    makers.update(extra or {})
    paths = []
    for tag, make in makers.items():
        fig = make()
        if out_dir is not None:
            name = _figure_name(tag.replace("ood_", "", 1).replace("/", "_"))
            paths.append(save_figure(fig, Path(out_dir) / "figures" / f"{name}.png"))
        if writer is not None:
            writer.add_figure(tag, fig, step)  # closes the figure
        else:
            plt.close(fig)
    return paths


__all__ = [
    "CCR_HEADERS",
    "HEADERS",
    "LOWER_IS_BETTER",
    "ccr_lines",
    "ccr_table",
    "density_figure",
    "format_csv",
    "format_markdown",
    "group_lines",
    "header",
    "log_score_figures",
    "metrics_table",
    "pct",
    "roc_figure",
    "save_figure",
    "shared_bins",
    "write_figures",
    "write_results",
]


#: Names that moved to :mod:`lightning_ood.analyses` and stay readable here for scripts that
#: import them from their old place (the benchmarks).
_MOVED = {
    "layer_histograms_figure": "fssd",
    "severity_of": "fssd",
    "severity_summary": "fssd",
    "severity_lines": "fssd",
    "severity_figure": "fssd",
    "robustness_summary": "fssd",
    "activated_neurons_figure": "line",
    "activated_neurons_summary": "line",
    "log_activated_neurons": "line",
    "format_neuron_overlap": "line",
    "format_neuron_overlap_csv": "line",
}


def __getattr__(name: str) -> Any:
    """The moved analyses, imported on first use (they import this module)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"lightning_ood.analyses.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
