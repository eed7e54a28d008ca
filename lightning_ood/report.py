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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_ood.io import atomic_write_text
from lightning_ood.metrics import METRIC_CONVENTIONS, METRIC_NAMES
from lightning_ood.protocol import COUNT_KEYS, PER_SET

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
    lines += ["", *metrics_table(results["metrics"])]
    if results.get("tuning"):
        lines += ["", *tuning_lines(results["tuning"])]
    if results.get("severity"):
        sev = results["severity"]
        lines += ["", *severity_lines(sev["detectors"], sev["metric"])]
    if results.get("neuron_overlap"):
        lines += ["", format_neuron_overlap(results["neuron_overlap"]).rstrip("\n")]
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


def _shared_bins(arrays: Sequence[Tensor], bins: int = 60) -> Any:
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
    bins = _shared_bins([s_id, *(b for _, (_, b) in sets)])
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


def layer_histograms_figure(
    detector: str, taps: Sequence[str], components: Mapping[str, Tensor]
) -> Any:
    """Per-layer components of a layer ensemble (FSSD paper Figure 6): one panel per tap, ID
    (the first entry of ``components``) against each OOD set, densities on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(taps)
    fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 3.0), squeeze=False)
    for j, (ax, tap) in enumerate(zip(axes[0], taps, strict=True)):
        cols = {n: c[:, j] for n, c in components.items() if c.dim() == 2 and c.shape[1] == k}
        bins = _shared_bins(list(cols.values()))
        if bins is not None:
            for n, v in cols.items():
                v = v[torch.isfinite(v)].double().numpy()
                if v.size:
                    ax.hist(v, bins=bins, density=True, histtype="step", lw=1.3, label=n)
        ax.set_title(f"{detector}: {tap}", fontsize=9)
        ax.set_xlabel("component")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def severity_of(set_name: str) -> tuple[str, str, int] | None:
    """``(base, corruption, severity)`` of a corrupted set named ``base/corruption/severity``
    (the names ``kind: corrupted`` entries expand to); None for any other set."""
    parts = set_name.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def severity_summary(
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str = "auroc"
) -> dict[str, dict[str, dict[str, float]]]:
    """Per detector and severity, ``metric`` over the corruption types (FSSD paper Figures 4
    and 5): mean, quartiles, min, max and the number of types. Non-corrupted sets are
    ignored; ``{}`` when there are none."""

    out: dict[str, dict[str, dict[str, float]]] = {}
    for det, per_set in metrics.items():
        by_sev: dict[int, list[float]] = {}
        for name, vals in per_set.items():
            parsed = severity_of(name)
            if parsed is not None:
                by_sev.setdefault(parsed[2], []).append(float(vals[metric]))
        if not by_sev:
            continue
        out[det] = {str(sev): _spread(by_sev[sev]) for sev in sorted(by_sev)}
    return out


def _spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, quartiles (numpy's linear interpolation), min, max and count of ``values``."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "mean": float(v.mean()),
        "q1": float(q1),
        "median": float(med),
        "q3": float(q3),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def severity_lines(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str,
    pooled: str = "corruption types",
) -> list[str]:
    """Markdown: per detector, mean [Q1, Q3] of ``metric`` per severity (in %).

    ``pooled`` names what the quartiles run over, after the largest count ``n`` of a cell:
    corruption types for :func:`severity_summary`, e.g. ``"runs (seeds)"`` for
    :func:`robustness_summary`.
    """
    if not summary:
        return []
    sevs = sorted({int(s) for per in summary.values() for s in per})
    n_pooled = max(int(v["n"]) for per in summary.values() for v in per.values())
    lines = [
        f"{HEADERS.get(metric, metric)} per corruption severity: mean [Q1, Q3] over "
        f"{n_pooled} {pooled}.",
        "",
        "| detector | " + " | ".join(f"severity {s}" for s in sevs) + " |",
        "|---|" + "---:|" * len(sevs),
    ]
    for det, per in summary.items():
        cells = []
        for s in sevs:
            v = per.get(str(s))
            cells.append("" if v is None else f"{pct(v['mean'])} [{pct(v['q1'])}, {pct(v['q3'])}]")
        lines.append(f"| {det} | " + " | ".join(cells) + " |")
    return lines


def severity_figure(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    metric: str = "auroc",
    pooled: str = "types",
) -> Any:
    """``metric`` against severity per detector: the mean as a line, the interquartile range
    as a band (FSSD paper Figures 4 and 5); ``pooled`` names what the band runs over, corruption
    types for :func:`severity_summary`, e.g. seeds for :func:`robustness_summary`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for det, per in summary.items():
        sevs = sorted(per, key=int)
        x = [int(s) for s in sevs]
        mean = [100 * per[s]["mean"] for s in sevs]
        line = ax.plot(x, mean, marker="o", label=det)[0]
        ax.fill_between(
            x,
            [100 * per[s]["q1"] for s in sevs],
            [100 * per[s]["q3"] for s in sevs],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("corruption severity")
    ax.set_ylabel(f"{HEADERS.get(metric, metric)} (%)")
    ax.set_title(f"{HEADERS.get(metric, metric)} vs severity (band: Q1-Q3 over {pooled})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_figures(
    out_dir: str | os.PathLike[str] | None,
    writer: Any,
    step: int,
    evaluation_scores: Mapping[str, Mapping[str, tuple[Tensor, Tensor]]],
    thresholds: Mapping[str, float],
    layer_components: Mapping[str, tuple[Sequence[str], Mapping[str, Tensor]]] | None = None,
    severity: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> list[Path]:
    """The paper pictures of one evaluation, as PNGs in ``<out_dir>/figures`` and, given a
    TensorBoard ``writer``, as figures: overlaid score densities with the threshold for every
    detector, per-layer component histograms of layer ensembles, AUROC against severity."""
    import matplotlib.pyplot as plt

    makers: dict[str, Any] = {}  # built one at a time: dozens of open figures cost memory
    for det, per_set in evaluation_scores.items():
        makers[f"ood_density/{det}"] = lambda d=det, p=per_set: density_figure(
            d, p, thresholds.get(d)
        )
    for det, (taps, comps) in (layer_components or {}).items():
        makers[f"ood_layers/{det}"] = lambda d=det, t=taps, c=comps: layer_histograms_figure(
            d, t, c
        )
    if severity:
        makers["ood_severity/auroc"] = lambda: severity_figure(severity, "auroc")
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
    "HEADERS",
    "LOWER_IS_BETTER",
    "density_figure",
    "format_csv",
    "format_markdown",
    "header",
    "layer_histograms_figure",
    "log_score_figures",
    "metrics_table",
    "pct",
    "roc_figure",
    "save_figure",
    "severity_figure",
    "severity_lines",
    "severity_of",
    "severity_summary",
    "write_figures",
    "write_results",
]


# == LINe analyses: activated neurons (paper Figure 1), class-specific overlap (Table 8) ==========
# Inputs come from lightning_ood.detectors.line: ``activated_neuron_counts`` (per-sample counts)
# and ``LINe.top_neuron_overlap`` / ``top_neuron_overlap`` (plain dicts).


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
        path = save_figure(fig, Path(out_dir) / f"{stem}.png")
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


__all__ += [
    "activated_neurons_figure",
    "activated_neurons_summary",
    "format_neuron_overlap",
    "format_neuron_overlap_csv",
    "log_activated_neurons",
]


def robustness_summary(
    runs: Sequence[tuple[int, Mapping[str, Any]]], ood_set: str, metric: str = "auroc"
) -> dict[str, dict[str, dict[str, float]]]:
    """``metric`` on ``ood_set`` per detector and severity over several runs (FSSD paper
    Figure 5: ID and OOD test data both corrupted, one ``lightning-ood test`` run per
    severity and seed). ``runs`` holds ``(severity, results)`` pairs, ``results`` an
    ``ood_results.json`` mapping (its ``metrics``); severity 0 = clean. Same shape as
    :func:`severity_summary` (mean, quartiles, min, max, n over the runs of a severity), so
    :func:`severity_lines` and :func:`severity_figure` draw it.

    Raises:
        ValueError: no run reports ``ood_set``, or a severity is negative.
    """

    by: dict[str, dict[int, list[float]]] = {}
    for severity, results in runs:
        if int(severity) < 0:
            raise ValueError(f"robustness_summary: severity must be >= 0, got {severity}")
        for det, per_set in results["metrics"].items():
            if ood_set in per_set:
                by.setdefault(det, {}).setdefault(int(severity), []).append(
                    float(per_set[ood_set][metric])
                )
    if not by:
        raise ValueError(f"robustness_summary: no run reports OOD set {ood_set!r}")
    return {det: {str(s): _spread(per[s]) for s in sorted(per)} for det, per in by.items()}


__all__ += ["robustness_summary"]
