"""Hyperparameter grids for post-hoc detectors, run from cached backbone outputs.

Every combination of a grid (e.g. LINe's δ × p_a × p_w) is fitted from the cached training
features and scored on cached validation sets; no network pass is repeated. The combination
with the best validation metric, averaged over *validation* OOD sets that are never reported,
is then scored once on the test sets. Selection data and reported data never overlap:

* OOD: a validation OOD set may not share its name with a reported test OOD set (refused);
* ID: unless explicit ID validation features are passed, a seeded permutation of the ID test
  features is split, ``id_val_fraction`` (half by default) for selection and the rest reported;
* layer-ensemble combiners (FSSD, Mahalanobis): fitted on a seeded ``combiner_fraction`` of
  each validation set, the selection metric is computed on the remaining part.

Command line (``lightning-ood-grid`` or ``python -m lightning_ood.grid``)::

    python -m lightning_ood.grid --config configs/line_densenet_cifar10.yaml \\
        --grid configs/grid/line_densenet_cifar10.yaml [--cache_dir .cache/features] \\
        [--ckpt_path X] [--out DIR] [--data.init_args.train_every 10 ...]

Arguments the grid command does not know are passed to the ``lightning-ood`` CLI parser.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lightning_ood.detectors import Detector, build_detector
from lightning_ood.features import CachedFeatures, FeatureCache, compute_features
from lightning_ood.metrics import METRIC_NAMES, ood_metrics
from lightning_ood.models.base import FEATURES, LOGITS, OODBackbone

#: Metrics where lower is better; every other metric of ``METRIC_NAMES`` is higher-is-better.
LOWER_IS_BETTER = frozenset({"fpr95", "fpr80", "fpr95_oodpos"})

#: Per detector kind, hyperparameters that only enter ``finalize``/``score``: combinations that
#: differ only in these share one accumulation pass (``update``) over the training features.
FINALIZE_ONLY: dict[str, frozenset[str]] = {
    "line": frozenset(
        {"delta", "p_a", "p_w", "clip", "act_prune", "weight_prune", "abs_contribution"}
    ),
    "dice": frozenset({"p", "clip"}),
    "dice_react": frozenset({"p", "percentile"}),
    "react": frozenset({"percentile", "temperature"}),
    "mahalanobis": frozenset({"combiner", "standardize", "default_layer"}),
}

#: Table headers; every FPR names its positive class.
HEADERS = {
    "fpr95": "FPR95↓ (ID+)",
    "fpr80": "FPR80↓ (ID+)",
    "fpr95_oodpos": "FPR95↓ (OOD+)",
    "auroc": "AUROC↑",
    "aupr_in": "AUPR-In↑",
    "aupr_out": "AUPR-Out↑",
    "detection_acc": "DetAcc↑",
}

#: Keys a grid YAML may hold.
SPEC_KEYS = (
    "detector",
    "base",
    "grid",
    "val_ood_sets",
    "select",
    "seed",
    "id_val_fraction",
    "combiner_fraction",
    "batch_size",
    "reference",
)


# -- results ---------------------------------------------------------------------------------
@dataclass
class GridResult:
    """Everything a grid run measured.

    Attributes:
        kind: detector registry name.
        base: hyperparameters shared by every combination.
        grid: the searched values per hyperparameter.
        select_metric: the validation metric that chose ``best``.
        rows: one per combination, in ``itertools.product`` order: ``params``, validation
            metrics per validation OOD set (``val``) and their mean (``val_mean``).
        best: index into ``rows`` of the selected combination.
        test: the selected combination's metrics per reported test OOD set and ``average``.
        reference: the declared reference configuration's ``params``, ``val_mean`` and
            ``test`` metrics (None if none was given); never part of the selection.
        meta: sizes, seeds, split and convention notes, timings, caller info.
    """

    kind: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    select_metric: str
    rows: list[dict[str, Any]]
    best: int
    test: dict[str, dict[str, float]]
    reference: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_params(self) -> dict[str, Any]:
        """The selected values of the searched hyperparameters."""
        return dict(self.rows[self.best]["params"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        return format_markdown(self)


def _pct(v: float) -> str:
    return "nan" if math.isnan(v) else f"{100 * v:.2f}"


def format_markdown(result: GridResult) -> str:
    """Validation table of every combination, then the selected one's test table (in %)."""
    meta = result.meta
    keys = list(result.grid)
    sel = result.select_metric
    second = "auroc" if sel != "auroc" else "fpr95"
    title = f"### Grid search: {result.kind}"
    if meta.get("id_set"):
        title += f", ID = {meta['id_set']} ({meta.get('data_version', meta['id_set'])})"
    if meta.get("model"):
        title += f", model = {meta['model']}"
    lines = [
        title,
        "",
        "Values in %. Higher score = more in-distribution; FPR columns name their positive "
        "class (ID+ is the papers' convention).",
        f"Selection: mean {HEADERS[sel]} over validation OOD sets {meta.get('val_ood_sets')} "
        f"({'lower' if sel in LOWER_IS_BETTER else 'higher'} is better; ties by "
        f"{HEADERS[second]}), on {meta.get('n_id_val')} ID validation samples "
        f"({meta.get('id_val_source')}). The test sets below were never used for selection.",
        "",
        "| " + " | ".join(keys) + f" | val {HEADERS[sel]} | val {HEADERS[second]} | |",
        "|" + "---:|" * (len(keys) + 2) + "---|",
    ]
    for i, row in enumerate(result.rows):
        cells = [str(row["params"][k]) for k in keys]
        mark = "**selected**" if i == result.best else ""
        vm = row["val_mean"]
        lines.append(f"| {' | '.join(cells)} | {_pct(vm[sel])} | {_pct(vm[second])} | {mark} |")
    chosen = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    lines += [
        "",
        f"#### Test sets, selected configuration ({chosen}); "
        f"{meta.get('n_id_test')} ID test samples",
        "",
        "| OOD set | " + " | ".join(HEADERS[m] for m in METRIC_NAMES) + " |",
        "|---|" + "---:|" * len(METRIC_NAMES),
    ]
    for ood, vals in result.test.items():
        label = f"**{ood}**" if ood == "average" else ood
        lines.append(f"| {label} | " + " | ".join(_pct(vals[m]) for m in METRIC_NAMES) + " |")
    if result.reference is not None:
        ref = ", ".join(f"{k}={v}" for k, v in result.reference["params"].items())
        lines += [
            "",
            f"#### Reference configuration ({ref}), declared before the run, not selected",
            "",
            "| OOD set | " + " | ".join(HEADERS[m] for m in METRIC_NAMES) + " |",
            "|---|" + "---:|" * len(METRIC_NAMES),
        ]
        for ood, vals in result.reference["test"].items():
            label = f"**{ood}**" if ood == "average" else ood
            lines.append(f"| {label} | " + " | ".join(_pct(vals[m]) for m in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"


# -- building blocks -------------------------------------------------------------------------
def check_feature_only(det: Detector) -> None:
    """Refuse detectors whose score needs the network and the inputs (input gradients)."""
    # ODIN declares needs_input_grad as a class constant, but with epsilon == 0 it only reads
    # the logits; FSSD/Mahalanobis already report it per instance.
    eps = getattr(det, "epsilon", None)
    if det.needs_input_grad and not (eps is not None and float(eps) == 0.0):
        raise ValueError(
            f"detector {det.name!r} ({type(det).__name__}, config {det.config()}) needs input "
            "gradients to score (input pre-processing, epsilon > 0), which cached features "
            "cannot provide; grid it with epsilon: 0, or score it with `lightning-ood test`"
        )


def detector_taps(det: Detector, backbone: OODBackbone) -> list[str]:
    """Taps ``det`` reads, resolving FSSD's ``taps=None`` against the backbone."""
    resolve = getattr(det, "resolve_taps", None)
    taps = resolve(backbone) if callable(resolve) and not det.taps else det.taps
    return [t for t in taps if t not in (FEATURES, LOGITS)]


def _require_taps(cached: CachedFeatures, taps: Sequence[str], what: str) -> CachedFeatures:
    missing = [t for t in taps if t not in cached.taps]
    if missing:
        raise ValueError(
            f"the cached features of {what} lack taps {missing} (stored: {sorted(cached.taps)}); "
            "extract them with these taps"
        )
    return cached


def _device(backbone: OODBackbone) -> torch.device:
    return next((p.device for p in backbone.parameters()), torch.device("cpu"))


def accumulate(
    det: Detector, backbone: OODBackbone, train: CachedFeatures | None, batch_size: int = 4096
) -> None:
    """``reset`` then ``update`` over the cached training features (no ``finalize``)."""
    device = _device(backbone)
    det.to(device)
    det.reset()
    if det.requires_fit and det.uses_training_data:
        if train is None:
            raise ValueError(f"detector {det.name!r} is fitted on the training set: pass `train`")
        for out, target in train.as_batches(batch_size, device):
            det.update(out, target, backbone)


def fit_from_cache(
    det: Detector, backbone: OODBackbone, train: CachedFeatures | None, batch_size: int = 4096
) -> Detector:
    """Fit ``det`` from cached training features exactly as one eval pass would."""
    accumulate(det, backbone, train, batch_size)
    det.finalize(backbone)
    return det


def score_cached(
    det: Detector, cached: CachedFeatures, batch_size: int = 4096, components: bool = False
) -> Tensor:
    """Scores (N,) — or per-layer components (N, K) with ``components`` — in float64 on CPU."""
    device = det.fitted.device
    fn = det.score_components if components else det.score
    chunks = [
        fn(out).detach().to("cpu", torch.float64)
        for out, _ in cached.as_batches(batch_size, device)
    ]
    return torch.cat(chunks)


def split_cached(
    cached: CachedFeatures, fraction: float, seed: int
) -> tuple[CachedFeatures, CachedFeatures]:
    """Seeded split: (first ``round(fraction·N)`` of a permutation, the rest)."""
    n = len(cached)
    k = round(fraction * n)
    if not 0 < k < n:
        raise ValueError(
            f"cannot split {n} samples with fraction={fraction}: both parts need >= 1 sample"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return cached.subset(perm[:k]), cached.subset(perm[k:])


def _split_index(n: int, fraction: float, seed: int, what: str) -> tuple[Tensor, Tensor]:
    k = round(fraction * n)
    if not 0 < k < n:
        raise ValueError(
            f"{what}: cannot hold out combiner_fraction={fraction} of {n} samples (both parts "
            "need >= 1 sample)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k], perm[k:]


def evaluate(s_id: Tensor, s_ood: Tensor) -> dict[str, float]:
    """:func:`ood_metrics` plus counts; NaN metrics when any score is non-finite."""
    bad = int((~torch.isfinite(s_id)).sum()) + int((~torch.isfinite(s_ood)).sum())
    counts = {"n_id": len(s_id), "n_ood": len(s_ood), "nonfinite": bad}
    if bad:
        return {**dict.fromkeys(METRIC_NAMES, math.nan), **counts}
    return {**ood_metrics(s_id, s_ood), **counts}


def _mean(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Average over sets; NaN if any set is NaN (a broken set must not vanish from a mean)."""
    return {m: sum(v[m] for v in per_set.values()) / len(per_set) for m in METRIC_NAMES}


def _rank_key(row: Mapping[str, Any], select: str, index: int) -> tuple[float, ...]:
    """Smaller is better: NaN last, then the selection metric, the tie-breaker, the order."""
    second = "auroc" if select != "auroc" else "fpr95"
    primary, tie = row["val_mean"][select], row["val_mean"][second]
    if math.isnan(primary):
        return (1.0, 0.0, 0.0, float(index))
    p = primary if select in LOWER_IS_BETTER else -primary
    t = tie if second in LOWER_IS_BETTER else -tie
    return (0.0, p, math.inf if math.isnan(t) else t, float(index))


def _combiner_state(det: Detector) -> dict[str, Any]:
    return {k: v.tolist() for k, v in det.named_buffers() if k.startswith("combiner")}


# -- the grid --------------------------------------------------------------------------------
def combinations(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of ``grid`` in ``itertools.product`` order (last key fastest)."""
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"grid must be a non-empty mapping name -> list of values, got {grid!r}")
    for k, values in grid.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"grid[{k!r}] must be a non-empty list of values, got {values!r}; write a "
                f"single value as [{values!r}]"
            )
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


def grid_search(
    kind: str,
    grid: Mapping[str, Sequence[Any]],
    base: Mapping[str, Any] | None,
    backbone: OODBackbone,
    train: CachedFeatures | None,
    id_val: CachedFeatures | None,
    ood_val: Mapping[str, CachedFeatures],
    id_test: CachedFeatures,
    ood_test: Mapping[str, CachedFeatures],
    select_metric: str = "fpr95",
    *,
    seed: int = 0,
    id_val_fraction: float = 0.5,
    combiner_fraction: float = 0.5,
    batch_size: int = 4096,
    reference: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> GridResult:
    """Fit and score every combination from cache; select on validation; report on test.

    Args:
        kind: detector registry name (``"line"``, ``"dice"``, ...).
        grid: hyperparameter -> list of values; every combination is tried.
        base: hyperparameters shared by all combinations (must not repeat a grid key).
        backbone: the network the features came from (its head is copied by ``finalize``).
        train: cached training-set outputs (eval transform), with the detector's taps; may
            be None for detectors that do not read the training set (MSP, Energy, FSSD).
        id_val: ID validation outputs, or None to split ``id_test`` (seeded,
            ``id_val_fraction`` for selection, the rest reported).
        ood_val: validation OOD sets, name -> outputs; used for selection only.
        id_test: ID test outputs (the reported part, or the whole set to split).
        ood_test: reported OOD sets, name -> outputs; never used for selection.
        select_metric: a key of ``METRIC_NAMES``; averaged over ``ood_val``.
        seed: seed of the ID split and of the combiner hold-out.
        id_val_fraction: share of ``id_test`` used for selection when ``id_val`` is None.
        combiner_fraction: share of each validation set that fits a layer-ensemble combiner.
        batch_size: rows per detector call (memory only; results do not depend on it).
        reference: an optional configuration declared up front (e.g. the paper's values),
            fitted and scored on the same validation and test data for comparison; it takes
            no part in the selection.
        info: caller facts copied into ``meta`` (id_set, data_version, model, ...).
        progress: show a progress bar over the combinations.

    Raises:
        ValueError: bad grid/metric, validation OOD set also reported, detector needing
            input gradients, missing taps.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    base = dict(base or {})
    if select_metric not in METRIC_NAMES:
        raise ValueError(f"select_metric={select_metric!r} is not one of {list(METRIC_NAMES)}")
    for reserved in ("type", "name"):
        if reserved in base or reserved in grid:
            raise ValueError(
                f"{reserved!r} may not be set in the grid or its base; the detector kind is "
                f"the `kind` argument ({kind!r})"
            )
    both = sorted(set(base) & set(grid))
    if both:
        raise ValueError(f"hyperparameters {both} are in both `base` and `grid`; keep one")
    if not ood_val:
        raise ValueError(
            "ood_val is empty: selection needs at least one validation OOD set that is not "
            "reported (e.g. val_ood_sets: [kmnist])"
        )
    if not ood_test:
        raise ValueError("ood_test is empty: name at least one reported test OOD set")
    overlap = sorted(set(ood_val) & set(ood_test))
    if overlap:
        raise ValueError(
            f"validation OOD sets {overlap} are also reported test sets; selecting on a test "
            "set inflates its numbers. Drop them from the test OOD sets or pick other "
            "validation sets"
        )
    combos = combinations(grid)
    dets = [build_detector(kind, {**base, **c}) for c in combos]  # validates every value first
    ref_det = None if reference is None else build_detector(kind, {**base, **reference})
    for det in [*dets, *([ref_det] if ref_det is not None else [])]:
        check_feature_only(det)
    taps = sorted({t for d in dets for t in detector_taps(d, backbone)})
    if dets[0].uses_training_data and dets[0].requires_fit:
        if train is None:
            raise ValueError(f"detector {kind!r} is fitted on the training set: pass `train`")
        _require_taps(train, taps, "the training set")
    if id_val is None:
        id_val, id_test = split_cached(id_test, id_val_fraction, seed)
        id_val_source = (
            f"seeded split of the ID test set: {id_val_fraction:g} for selection, the rest "
            f"reported, seed {seed}"
        )
    else:
        id_val_source = str((info or {}).get("id_val_source", "explicit ID validation set"))
    _require_taps(id_val, taps, "the ID validation set")
    _require_taps(id_test, taps, "the ID test set")
    for n, c in ood_val.items():
        _require_taps(c, taps, f"validation OOD set {n!r}")
    for n, c in ood_test.items():
        _require_taps(c, taps, f"test OOD set {n!r}")

    needs_val = dets[0].needs_validation
    if needs_val:  # seeded (fit, select) halves of every validation set for the combiner
        id_fit, id_sel = _split_index(len(id_val), combiner_fraction, seed, "ID validation set")
        ood_idx = {
            n: _split_index(len(c), combiner_fraction, seed, f"validation OOD set {n!r}")
            for n, c in ood_val.items()
        }

    free = FINALIZE_ONLY.get(kind, frozenset())
    groups: dict[str, list[int]] = {}
    for i, det in enumerate(dets):
        key = {k: v for k, v in det.config().items() if k not in free and k != "name"}
        groups.setdefault(json.dumps(key, sort_keys=True, default=repr), []).append(i)

    def validate(det: Detector) -> dict[str, dict[str, float]]:
        """Validation metrics per validation OOD set (fits the combiner first if any)."""
        val: dict[str, dict[str, float]] = {}
        if needs_val:
            cid = score_cached(det, id_val, batch_size, components=True)
            cood = {
                n: score_cached(det, c, batch_size, components=True) for n, c in ood_val.items()
            }
            bad = int((~torch.isfinite(cid)).sum()) + sum(
                int((~torch.isfinite(c)).sum()) for c in cood.values()
            )
            if bad:  # no combiner can be fitted: this combination ranks last (NaN)
                nan = dict.fromkeys(METRIC_NAMES, math.nan)
                return {
                    n: {**nan, "n_id": len(id_sel), "n_ood": len(ood_idx[n][1]), "nonfinite": bad}
                    for n in cood
                }
            det.fit_combiner(cid[id_fit], torch.cat([cood[n][ood_idx[n][0]] for n in cood]))
            s_id = det.combine(cid[id_sel])
            for n in cood:
                val[n] = evaluate(s_id, det.combine(cood[n][ood_idx[n][1]]))
        else:
            s_id = score_cached(det, id_val, batch_size)
            for n, c in ood_val.items():
                val[n] = evaluate(s_id, score_cached(det, c, batch_size))
        return val

    def report(det: Detector) -> dict[str, dict[str, float]]:
        """Test metrics per reported OOD set and their average."""

        def scores(c: CachedFeatures) -> Tensor:
            s = score_cached(det, c, batch_size, components=needs_val)
            return det.combine(s) if needs_val else s

        s_id = scores(id_test)
        test = {n: evaluate(s_id, scores(c)) for n, c in ood_test.items()}
        test["average"] = _mean(test)
        return test

    rows: list[dict[str, Any]] = [{}] * len(dets)
    best: tuple[tuple[float, ...], int, Detector] | None = None
    bar = tqdm(total=len(dets), desc=f"grid {kind}", disable=not progress, leave=False)
    for members in groups.values():
        proto = copy.deepcopy(dets[members[0]])
        accumulate(proto, backbone, train, batch_size)  # once per group of combinations
        for i in members:
            det = copy.deepcopy(proto)
            for k in free:
                if hasattr(dets[i], k):
                    setattr(det, k, getattr(dets[i], k))
            det.name = dets[i].name
            if det.config() != dets[i].config():  # the copy must be the configured detector
                raise RuntimeError(f"grid: rebuilt {det.config()} != {dets[i].config()}")
            det.finalize(backbone)
            val = validate(det)
            rows[i] = {"params": combos[i], "val": val, "val_mean": _mean(val)}
            if needs_val:
                rows[i]["combiner"] = _combiner_state(det)
            rank = _rank_key(rows[i], select_metric, i)
            if best is None or rank < best[0]:
                best = (rank, i, det)
            bar.update()
    bar.close()
    assert best is not None
    _, best_i, best_det = best
    test = report(best_det)

    ref_out: dict[str, Any] | None = None
    if ref_det is not None and reference is not None:  # declared up front, never selected
        fit_from_cache(ref_det, backbone, train, batch_size)
        ref_val = validate(ref_det)
        ref_out = {
            "params": dict(reference),
            "val_mean": _mean(ref_val),
            "test": report(ref_det),
        }
    meta: dict[str, Any] = {
        **dict(info or {}),
        "convention": "higher score = more in-distribution; ID is the positive class for "
        "FPR/AUPR-In (the papers' convention); fpr95_oodpos uses OOD as positive",
        "val_ood_sets": list(ood_val),
        "test_ood_sets": list(ood_test),
        "n_train": 0 if train is None else len(train),
        "n_id_val": len(id_val),
        "n_id_test": len(id_test),
        "id_val_source": id_val_source,
        "seed": seed,
        "combiner_fraction": combiner_fraction if needs_val else None,
        "best_config": best_det.config(),
        "fit_groups": len(groups),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return GridResult(
        kind=kind,
        base=base,
        grid={k: list(v) for k, v in grid.items()},
        select_metric=select_metric,
        rows=rows,
        best=best_i,
        test=test,
        reference=ref_out,
        meta=meta,
    )


# -- command line ----------------------------------------------------------------------------
def load_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a grid YAML (keys: :data:`SPEC_KEYS`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid spec {str(p)!r} does not exist")
    spec = yaml.safe_load(p.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"grid spec {str(p)!r} must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"grid spec {str(p)!r}: unknown keys {unknown}; allowed: {list(SPEC_KEYS)}"
        )
    for key in ("detector", "grid"):
        if key not in spec:
            raise ValueError(f"grid spec {str(p)!r} needs `{key}`")
    vals = spec.get("val_ood_sets")
    if vals is not None and (isinstance(vals, str) or not isinstance(vals, list)):
        raise ValueError(f"grid spec {str(p)!r}: val_ood_sets must be a list of set names")
    return spec


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-ood-grid",
        description="Grid-search a detector's hyperparameters from cached features; select on "
        "validation OOD sets, report on the test sets. Unknown arguments go to the "
        "lightning-ood CLI (e.g. --data.init_args.train_every 10).",
    )
    p.add_argument("--config", action="append", required=True, help="lightning-ood config(s)")
    p.add_argument("--grid", required=True, help="grid YAML (detector, base, grid, ...)")
    p.add_argument("--cache_dir", default=".cache/features", help="feature cache folder")
    p.add_argument("--no_cache", action="store_true", help="compute features, store nothing")
    p.add_argument("--ckpt_path", default=None, help="checkpoint whose backbone weights to use")
    p.add_argument("--out", default=None, help="results folder (default logs/grid/<experiment>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(args: Sequence[str] | None = None) -> GridResult:
    """Entry point of ``lightning-ood-grid`` / ``python -m lightning_ood.grid``."""
    from lightning_ood.cli import main as cli_main
    from lightning_ood.models.weights import load_weights

    ns, extra = _parser().parse_known_args(args)
    spec = load_spec(ns.grid)
    spec_val = spec.get("val_ood_sets")
    cli_args: list[str] = []
    for cfg in ns.config:
        cli_args += ["--config", cfg]
    with warnings.catch_warnings():  # our own argv is not LightningCLI's: that is intended
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = cli_main([*cli_args, *extra], run=False)
    task, dm = cli.model, cli.datamodule
    backbone: OODBackbone = task.backbone
    if ns.ckpt_path:
        load_weights(backbone, ns.ckpt_path, model_name=task.hparams.get("model"))
    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone.to(device).eval()

    user_val = any(a.split("=")[0].endswith(".val_ood_sets") for a in extra)
    if spec_val is not None and not user_val:  # the grid spec names the validation sets
        from lightning_ood.data import parse_ood_spec

        dm.val_ood_specs = [parse_ood_spec(e) for e in spec_val]
    val_names = list(dm.val_ood_names)
    if spec_val is not None:
        wanted = [e if isinstance(e, str) else e.get("name") for e in spec_val]
        missing = [n for n in wanted if n not in val_names]
        if missing:
            raise ValueError(
                f"grid spec {ns.grid!r} names validation OOD sets {missing}, but "
                f"--data.init_args.val_ood_sets sets {val_names}; make them agree"
            )
        val_names = wanted
    if not val_names:
        raise ValueError(
            "no validation OOD set: name some in the grid spec (val_ood_sets: [...]) or with "
            "--data.init_args.val_ood_sets; they must differ from the reported ood_sets"
        )
    names = list(dm.test_set_names)
    overlap = sorted(set(val_names) & set(names[1:]))
    if overlap:  # checked before any data is read
        raise ValueError(
            f"validation OOD sets {overlap} are also reported test sets {names[1:]}; drop them "
            "from the test sets (--data.init_args.ood_sets [...]) or validate on other sets "
            "(a registry set with its own validation split can be named apart: "
            "{name: <set>_val, kind: <set>})"
        )
    dm.prepare_data()
    dm.setup("test")
    all_val = dm.val_ood_dataloaders()
    val_loaders = {n: all_val[n] for n in val_names}
    test_loaders = dm.test_dataloader()
    test_loaders = test_loaders if isinstance(test_loaders, list | tuple) else [test_loaders]

    kind = spec["detector"]
    base = dict(spec.get("base") or {})
    probe = [build_detector(kind, {**base, **c}) for c in combinations(spec["grid"])]
    taps = sorted({t for d in probe for t in detector_taps(d, backbone)})
    progress = not ns.no_progress
    cache = None if ns.no_cache else FeatureCache(ns.cache_dir)

    def features(loader: Any, what: str) -> CachedFeatures:
        if cache is None:
            return compute_features(backbone, loader, taps, progress=progress, desc=what)
        return cache.get_or_compute(backbone, loader, taps, progress=progress, desc=what)

    t0 = time.perf_counter()
    train = None
    if probe[0].requires_fit and probe[0].uses_training_data:
        train = features(dm.fit_dataloader(), "train")
    id_test = features(test_loaders[0], names[0])
    id_val, id_val_source = None, None
    val_size = int(getattr(dm, "val_size", 0) or 0)
    if val_size > 0:  # the datamodule holds out training samples: select on those
        id_val = features(dm.val_dataloader(), f"val:{names[0]}")
        id_val_source = f"{val_size} training samples held out by the datamodule (val_size)"
    ood_test = {n: features(ld, n) for n, ld in zip(names[1:], test_loaders[1:], strict=True)}
    ood_val = {n: features(ld, f"val:{n}") for n, ld in val_loaders.items()}
    feature_s = time.perf_counter() - t0
    info = {
        "id_set": getattr(dm, "id_name", names[0]),
        "data_version": getattr(dm, "data_version", names[0]),
        "model": task.hparams.get("model"),
        "ckpt_path": ns.ckpt_path,
        "configs": list(ns.config),
        "grid_spec": str(ns.grid),
        "cli_overrides": list(extra),
        "feature_seconds": round(feature_s, 3),
        **({"id_val_source": id_val_source} if id_val_source else {}),
        "cache": None
        if cache is None
        else {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
    }
    result = grid_search(
        kind,
        spec["grid"],
        base,
        backbone,
        train,
        id_val,
        ood_val,
        id_test,
        ood_test,
        spec.get("select", "fpr95"),
        seed=int(spec.get("seed", 0)),
        id_val_fraction=float(spec.get("id_val_fraction", 0.5)),
        combiner_fraction=float(spec.get("combiner_fraction", 0.5)),
        batch_size=int(spec.get("batch_size", 4096)),
        reference=spec.get("reference"),
        info=info,
        progress=progress,
    )
    experiment = getattr(cli.config, "experiment", None) or "default"
    out = Path(ns.out or Path("logs") / "grid" / str(experiment))
    out.mkdir(parents=True, exist_ok=True)
    md = result.to_markdown()
    _atomic_write(out / "grid_results.md", md)
    _atomic_write(out / "grid_results.json", json.dumps(result.to_dict(), indent=2, default=str))
    print("\n" + md)
    print(f"[lightning_ood] grid results written to {out}/grid_results.{{md,json}}")
    return result


def entrypoint() -> None:
    """Console script ``lightning-ood-grid``; returns nothing (see ``lightning_ood.cli``)."""
    main()


if __name__ == "__main__":
    entrypoint()
