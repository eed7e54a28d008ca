"""The checkpoint's card: where every shipped number came from, readable without the code that
wrote it (``lightning-ood inspect CKPT``, ``lightning_ood.load(ckpt).card``, ``card`` in the
server's ``GET /info``).

A card is plain data in ``checkpoint["lightning_ood"]["card"]``: the model and where its
weights came from, the ID set and data version, the training recipe, each shipped detector
with its hyperparameters (tuned or not, on which validation sets, by which metric), its
threshold and the TPR it was calibrated at, the shipped combiner of layer ensembles, the
metrics of the shipped rows per OOD set, the project version and commit. :func:`card_of`
reads it, or rebuilds what it can from a checkpoint written before cards existed, marking
every field it cannot know as ``"unknown"``. Pure Python + torch; no Lightning.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The value of a field an older checkpoint does not record.
UNKNOWN = "unknown"
#: Bumped when the card's layout changes.
CARD_FORMAT = 1
#: Metrics the card keeps per (shipped detector, OOD set).
CARD_METRICS = ("auroc", "fpr95", "aupr_in", "aupr_out", "n_id", "n_ood")


def git_commit() -> str:
    """The commit of the checkout lightning_ood runs from, or ``unknown`` (installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        if Path(top).resolve() != root:  # an installed copy inside some other repository
            return UNKNOWN
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() + (" (modified)" if dirty else "")


def build_card(
    *,
    hparams: Mapping[str, Any],
    data: Mapping[str, Any],
    detectors: Mapping[str, Mapping[str, Any]],
    training: Mapping[str, Any],
    weights_origin: str,
    train_splits: list[Any],
    outliers: list[Any],
    reported: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The card of a checkpoint being written (see the module docstring); ``detectors`` maps a
    name to ``{"config", "threshold", "threshold_tpr", "tuned", "combiner"}``."""
    from lightning_ood import __version__

    kwargs = {k: v for k, v in dict(hparams.get("model_kwargs") or {}).items() if k != "weights"}
    return {
        "format": CARD_FORMAT,
        "lightning_ood_version": __version__,
        "git_commit": git_commit(),
        "model": {
            "name": hparams.get("model", UNKNOWN),
            "num_classes": hparams.get("num_classes", UNKNOWN),
            "model_kwargs": kwargs,
            "weights_origin": weights_origin,
        },
        "data": {
            "id_set": data.get("id_set", UNKNOWN),
            "data_version": data.get("data_version", UNKNOWN),
            "class_names": list(data.get("class_names") or []) or UNKNOWN,
            "input_shape": list(data.get("input_shape") or []) or UNKNOWN,
            "train_splits": list(train_splits) or UNKNOWN,
            "outlier_exposure": list(outliers),
        },
        "training": dict(training),
        "detectors": {n: dict(d) for n, d in detectors.items()},
        "reported": dict(reported) if reported else UNKNOWN,
    }


def reported_of(results: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The shipped rows of an evaluation's results (``OODEvaluation.results``) for ``names``:
    their metrics per OOD set, the convention and the data they were measured on."""
    metrics = results.get("metrics") or {}
    rows = {
        n: {ood: {k: _num(v[k]) for k in CARD_METRICS if k in v} for ood, v in metrics[n].items()}
        for n in names
        if n in metrics
    }
    return {
        "convention": results.get("convention", UNKNOWN),
        "id_set": results.get("id_set", UNKNOWN),
        "data_version": results.get("data_version", UNKNOWN),
        "rows": rows,
    }


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def card_of(ckpt: Mapping[str, Any], source: str = "<checkpoint>") -> dict[str, Any]:
    """The card of a loaded checkpoint dict: the stored one, or for an older checkpoint one
    rebuilt from its hyperparameters, data record and detector buffers, with ``unknown`` for
    everything it does not record."""
    section = ckpt.get("lightning_ood") if isinstance(ckpt, Mapping) else None
    section = section if isinstance(section, Mapping) else {}
    stored = section.get("card")
    if isinstance(stored, Mapping):
        return {**dict(stored), "source": source}
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    hp = hp if isinstance(hp, Mapping) else {}
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    state = state if isinstance(state, Mapping) else {}
    combiners = section.get("shipped_combiners") or {}
    dets: dict[str, Any] = {}
    for name, cfg in dict(hp.get("detectors") or {}).items():
        thr = state.get(f"detectors.{name}.threshold")
        tpr = state.get(f"detectors.{name}.threshold_tpr")
        dets[name] = {
            "config": cfg,
            "threshold": _tensor_value(thr),
            "threshold_tpr": _tensor_value(tpr),
            "tuned": UNKNOWN,
            "combiner": combiners.get(name, UNKNOWN),
        }
    card = build_card(
        hparams=hp,
        data=dict(section.get("data") or {}),
        detectors=dets,
        training={
            "epoch": ckpt.get("epoch", UNKNOWN),
            "global_step": ckpt.get("global_step", UNKNOWN),
        },
        weights_origin=UNKNOWN,
        train_splits=list(section.get("train_splits") or []),
        outliers=list(section.get("outliers") or []),
        reported=None,
    )
    card.update(lightning_ood_version=UNKNOWN, git_commit=UNKNOWN, source=source, format=UNKNOWN)
    return card


def _tensor_value(t: Any) -> Any:
    if t is None:
        return UNKNOWN
    try:
        v = float(t)
    except (TypeError, ValueError):
        return UNKNOWN
    return None if math.isnan(v) else v


def format_card(card: Mapping[str, Any]) -> str:
    """The card as Markdown tables (what ``lightning-ood inspect`` prints). The card is the
    file's own claim: malformed entries are printed as such, and control characters (terminal
    escape sequences) are dropped."""
    try:
        text = _format_card(card)
    except (TypeError, AttributeError, ValueError) as err:
        text = f"malformed card ({type(err).__name__}: {err}); use --json to see it raw\n"
    return "".join(c for c in text if c == "\n" or ord(c) >= 32)


def _format_card(card: Mapping[str, Any]) -> str:
    model, data = card.get("model") or {}, card.get("data") or {}
    lines = [
        f"# {card.get('source', 'checkpoint')}",
        "",
        f"- lightning-ood {card.get('lightning_ood_version', UNKNOWN)}, commit "
        f"{card.get('git_commit', UNKNOWN)}, card format {card.get('format', UNKNOWN)}",
        f"- model: {model.get('name', UNKNOWN)} ({model.get('num_classes', UNKNOWN)} classes), "
        f"model_kwargs {json.dumps(model.get('model_kwargs', {}))}",
        f"- weights: {model.get('weights_origin', UNKNOWN)}",
        f"- ID set: {data.get('id_set', UNKNOWN)} ({data.get('data_version', UNKNOWN)}), "
        f"input {data.get('input_shape', UNKNOWN)}",
        f"- training split: {json.dumps(data.get('train_splits', UNKNOWN))}",
        f"- training: {json.dumps(card.get('training', UNKNOWN))}",
    ]
    if data.get("outlier_exposure"):
        names = [r.get("name", "?") for r in data["outlier_exposure"] if isinstance(r, Mapping)]
        lines.append(f"- trained with Outlier Exposure on: {', '.join(names)}")
    lines += [
        "",
        "| detector | hyperparameters | tuned | threshold | calibrated at TPR | combiner |",
        "|---|---|---|---:|---:|---|",
    ]
    for name, d in (card.get("detectors") or {}).items():
        cfg = {k: v for k, v in dict(d.get("config") or {}).items() if k not in ("name",)}
        tuned = d.get("tuned")
        if isinstance(tuned, Mapping):
            tuned = (
                f"by validation {tuned.get('select')} on {', '.join(tuned.get('val_ood_sets', []))}"
                f" + {tuned.get('id_validation', 'ID validation')}"
            )
        comb = d.get("combiner")
        if isinstance(comb, Mapping):
            comb = f"{comb.get('method')} ({comb.get('n_id')} ID + {comb.get('n_ood')})"
        thr = d.get("threshold")
        lines.append(
            f"| {name} | {json.dumps(cfg)} | {tuned if tuned else 'no'} | "
            f"{_fmt(thr)} | {_fmt(d.get('threshold_tpr'))} | {comb or '-'} |"
        )
    reported = card.get("reported")
    if isinstance(reported, Mapping) and reported.get("rows"):
        lines += [
            "",
            f"Reported (the shipped rows; {reported.get('data_version')}; "
            f"{reported.get('convention')}):",
            "",
            "| detector | OOD set | AUROC | FPR95 | n_id | n_ood |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, per_set in reported["rows"].items():
            for ood, m in per_set.items():
                lines.append(
                    f"| {name} | {ood} | {_pct(m.get('auroc'))} | {_pct(m.get('fpr95'))} | "
                    f"{m.get('n_id', '')} | {m.get('n_ood', '')} |"
                )
    else:
        lines += [
            "",
            f"Reported metrics: {UNKNOWN} (run `lightning-ood test` on it to record them)",
        ]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, int | float) else str(v if v is not None else UNKNOWN)


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}" if isinstance(v, int | float) else UNKNOWN


__all__ = [
    "CARD_FORMAT",
    "UNKNOWN",
    "build_card",
    "card_of",
    "format_card",
    "git_commit",
    "reported_of",
]
