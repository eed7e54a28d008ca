"""FSSD paper analyses (Huang et al. 2021): per-layer component histograms (Figure 6) and
OOD detection against corruption severity (Figures 4 and 5). Pure functions over the scores
and metrics an evaluation produced; :class:`lightning_ood.session.EvaluationSession` calls
:func:`results` and :func:`figure_makers` whenever a layer ensemble or a corrupted set is
evaluated, so the generic callback and report know nothing of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_ood import report
from lightning_ood.detectors.base import Detector
from lightning_ood.models.base import OODBackbone

#: The metric of the severity summary and figure.
SEVERITY_METRIC = "auroc"


def layer_components(
    detectors: Mapping[str, Detector],
    backbone: OODBackbone,
    banks: Mapping[str, Sequence[Tensor]],
    set_names: Sequence[str],
) -> dict[str, tuple[list[str], dict[str, Tensor]]]:
    """Per layer ensemble with several components, its tap names and its (N, K) components
    per set (ID first): the input of :func:`layer_histograms_figure`."""
    out: dict[str, tuple[list[str], dict[str, Tensor]]] = {}
    for name, det in detectors.items():
        taps = list(det.component_names(backbone))
        if det.has_combiner and len(taps) > 1:
            out[name] = (taps, dict(zip(set_names, banks[name], strict=True)))
    return out


def results(metrics: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
    """``{"severity": {"metric", "detectors"}}`` when corrupted sets were reported (Figure 4's
    numbers for the results file), else ``{}``."""
    summary = severity_summary(metrics, SEVERITY_METRIC)
    return {"severity": {"metric": SEVERITY_METRIC, "detectors": summary}} if summary else {}


def markdown(results_: Mapping[str, Any]) -> list[str]:
    """The severity table of a results mapping (empty without corrupted sets)."""
    sev = results_.get("severity")
    return severity_lines(sev["detectors"], sev["metric"]) if sev else []


def figure_makers(
    layers: Mapping[str, tuple[Sequence[str], Mapping[str, Tensor]]] | None,
    severity: Mapping[str, Mapping[str, Mapping[str, float]]] | None,
) -> dict[str, Callable[[], Any]]:
    """``{TensorBoard tag: figure maker}`` of Figure 6 per layer ensemble and of Figure 4
    (for :func:`lightning_ood.report.write_figures`; built lazily, one open figure at a time)."""
    makers: dict[str, Callable[[], Any]] = {}
    for det, (taps, comps) in (layers or {}).items():
        makers[f"ood_layers/{det}"] = lambda d=det, t=taps, c=comps: layer_histograms_figure(
            d, t, c
        )
    if severity:
        makers[f"ood_severity/{SEVERITY_METRIC}"] = lambda: severity_figure(
            severity, SEVERITY_METRIC
        )
    return makers


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
        bins = report.shared_bins(list(cols.values()))
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
        f"{report.HEADERS.get(metric, metric)} per corruption severity: mean [Q1, Q3] over "
        f"{n_pooled} {pooled}.",
        "",
        "| detector | " + " | ".join(f"severity {s}" for s in sevs) + " |",
        "|---|" + "---:|" * len(sevs),
    ]
    for det, per in summary.items():
        cells = []
        for s in sevs:
            v = per.get(str(s))
            cells.append(
                ""
                if v is None
                else f"{report.pct(v['mean'])} [{report.pct(v['q1'])}, {report.pct(v['q3'])}]"
            )
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
    ax.set_ylabel(f"{report.HEADERS.get(metric, metric)} (%)")
    ax.set_title(f"{report.HEADERS.get(metric, metric)} vs severity (band: Q1-Q3 over {pooled})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


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


__all__ = [
    "SEVERITY_METRIC",
    "figure_makers",
    "layer_components",
    "layer_histograms_figure",
    "markdown",
    "results",
    "robustness_summary",
    "severity_figure",
    "severity_lines",
    "severity_of",
    "severity_summary",
]
