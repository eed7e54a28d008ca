"""Validation-tuned hyperparameters: the one selection core of the grid and of ``tune:``.

OpenOOD's protocol (Zhang et al. 2023, v1.5 §3): every detector's hyperparameters are chosen
on held-out ID validation data and validation OOD sets that are never reported, then the
chosen configuration alone is tested. This module holds the three steps both entry points
share, on top of :mod:`lightning_ood.engine`:

* :func:`plan` — the candidate detectors of one search (a declared ``search_space`` or a
  user grid over it), every value validated up front;
* :func:`fit_candidates` — candidates that differ only in ``finalize_only`` values share one
  accumulation; every group (and any other detector being fitted) takes ONE pass over the
  training outputs;
* :func:`select` — validation metrics per candidate from their scores, a combiner fitted on a
  seeded part of each validation set for layer ensembles, and the best by the selection
  metric (ties broken by the other of AUROC/FPR95, then by order).

The grid (:mod:`lightning_ood.grid`) feeds them cached features; the OOD callback the scores
of its single forward pass over the validation loaders.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_ood import engine
from lightning_ood.detectors import Detector, build_detector
from lightning_ood.detectors.base import Reducer
from lightning_ood.metrics import METRIC_NAMES
from lightning_ood.models.base import OODBackbone
from lightning_ood.protocol import average, evaluate_pair, holds_out, rank_key, unfittable
from lightning_ood.splits import fraction_size, seeded_parts

#: Key of the ID validation set among the validation score sets (never an OOD set name).
ID_KEY = "__id_validation__"


@dataclass
class Search:
    """One detector's search: ``candidates[i]`` is ``kind`` configured with ``base`` and
    ``combos[i]``; the instance names are ``"{name}[{i}]"``."""

    name: str
    kind: str
    base: dict[str, Any]
    space: dict[str, list[Any]]
    combos: list[dict[str, Any]]
    candidates: list[Detector]


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


def plan(
    name: str,
    kind: str,
    space: Mapping[str, Sequence[Any]] | None,
    base: Mapping[str, Any] | None = None,
) -> Search:
    """The candidates of one search. ``space=None`` takes the detector class's declared
    ``search_space``.

    Raises:
        ValueError: a key that is not a hyperparameter of ``kind`` (the valid ones are
            listed), a key in both ``base`` and ``space``, an empty list, no search space.
    """
    from lightning_ood.detectors import DETECTORS

    if kind not in DETECTORS:
        raise ValueError(f"tune: unknown detector kind {kind!r}; known: {sorted(DETECTORS)}")
    cls = DETECTORS[kind]
    base = {k: v for k, v in dict(base or {}).items() if k not in ("type", "name")}
    if space is None:
        space = cls.search_space
        if not space:
            raise ValueError(
                f"tune: detector {name!r} ({kind}) declares no search space (it has no "
                "hyperparameter worth tuning); remove it from `tune` or give its grid"
            )
    params = set(build_detector(kind, base).config()) - {"type", "name"}
    unknown = sorted(set(space) - params)
    if unknown:
        raise ValueError(
            f"tune: {unknown} are not hyperparameters of detector {name!r} ({kind}); its "
            f"hyperparameters are {sorted(params)}"
        )
    space = {
        k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for k, v in space.items()
    }
    combos = combinations(space)
    base = {k: v for k, v in base.items() if k not in space}
    candidates = [
        build_detector(f"{name}[{i}]", {"type": kind, **base, **c}) for i, c in enumerate(combos)
    ]
    return Search(name, kind, base, dict(space), combos, candidates)  # type: ignore[arg-type]


def searches_for(
    detectors: Mapping[str, Detector],
    wanted: Mapping[str, Mapping[str, Sequence[Any]] | None] | None,
) -> tuple[list[Search], bool]:
    """The searches a ``tune.detectors`` value asks for over the configured ``detectors``: each
    named detector over its grid (``None``: its class's ``search_space``), its other
    hyperparameters kept. ``wanted=None`` tunes every detector that declares a search space
    and returns ``auto=True``: the caller then keeps a detector whose every value this
    backbone rules out, instead of refusing the run.

    Raises:
        ValueError: a named detector is not configured.
    """
    auto = wanted is None
    if wanted is None:
        wanted = {n: None for n, d in detectors.items() if type(d).search_space}
    missing = sorted(set(wanted) - set(detectors))
    if missing:
        raise ValueError(
            f"tune: detectors {missing} are not configured; known: {sorted(detectors)}"
        )
    searches = [
        plan(n, detectors[n].kind, space, detectors[n].config()) for n, space in wanted.items()
    ]
    return searches, auto


def _free(det: Detector) -> frozenset[str]:
    """Hyperparameters that may differ within one accumulation group."""
    return type(det).finalize_only if engine.reads_training_data(det) else frozenset()


def fit_candidates(
    candidates: Sequence[Detector],
    backbone: OODBackbone,
    outputs: engine.OutputSource | None,
    reducer: Reducer | None = None,
    *,
    others: Sequence[Detector] = (),
) -> tuple[list[Detector], int, dict[str, str]]:
    """Fit every candidate (and ``others``, configured detectors fitted as usual) from ONE
    pass over the training ``outputs``.

    Candidates that differ only in ``finalize_only`` values form a group: one prototype
    accumulates, and each member is a copy of it finalized under its own values (extra passes
    an exact percentile asks for are shared by all). Returns the fitted candidates, in order
    (those the backbone makes invalid left out), the number of groups, and
    ``{candidate name: why}`` of the invalid ones (e.g. ViM ``dim`` >= the feature width);
    the callers decide what an all-invalid search means.
    """
    groups: dict[str, list[int]] = {}
    for i, det in enumerate(candidates):
        key = {k: v for k, v in det.config().items() if k not in _free(det) and k != "name"}
        groups.setdefault(json.dumps(key, sort_keys=True, default=repr), []).append(i)
    protos = [copy.deepcopy(candidates[members[0]]) for members in groups.values()]
    engine.fit_detectors([*protos, *others], backbone, outputs, reducer, finalize=False)
    fitted: list[Detector | None] = [None] * len(candidates)
    for proto, members in zip(protos, groups.values(), strict=True):
        for i in members:
            det = copy.deepcopy(proto)
            for k in _free(proto):
                setattr(det, k, getattr(candidates[i], k))
            det.name = candidates[i].name
            if det.config() != candidates[i].config():  # the copy must be the configured one
                raise RuntimeError(f"tuning: rebuilt {det.config()} != {candidates[i].config()}")
            fitted[i] = det
    done = [d for d in fitted if d is not None]
    restart = engine.restart_of(outputs)
    engine.extra_passes([*others, *done], backbone, reducer, restart)  # shared by all
    engine.finalize_detectors(others, backbone, reducer, passes=False)
    invalid: dict[str, str] = {}
    engine.finalize_detectors(done, backbone, reducer, invalid=invalid, passes=False)
    return [d for d in done if d.name not in invalid], len(groups), invalid


def combines(det: Detector, backbone: OODBackbone) -> bool:
    """The protocol's rule: only an ensemble of several components fits a combiner."""
    return holds_out(det, len(det.component_names(backbone)), 1)


def split_index(n: int, fraction: float, seed: int, what: str) -> tuple[Tensor, Tensor]:
    """Seeded ``(first round(fraction·n) of a permutation, the rest)``."""
    head, rest = seeded_parts(n, [fraction_size(n, fraction)], seed, f"{what} (combiner_fraction)")
    return head, rest


class Validation:
    """Validation scores of a set of candidates and the metrics they give.

    Args:
        score: ``score(detectors, components) -> {set name: {detector name: scores}}`` for
            the ID validation set (key ``id_key``) and every validation OOD set; combining
            detectors are asked for their components (B, K).
        backbone: resolves each detector's taps (combiner or not).
        seed, combiner_fraction: the seeded (fit, select) halves for combiners.
    """

    def __init__(
        self,
        score: Callable[[Mapping[str, Detector], bool], Mapping[str, Mapping[str, Tensor]]],
        id_key: str,
        backbone: OODBackbone,
        *,
        seed: int = 0,
        combiner_fraction: float = 0.5,
    ) -> None:
        self.score_fn, self.id_key, self.backbone = score, id_key, backbone
        self.seed, self.combiner_fraction = seed, combiner_fraction

    def metrics(self, candidates: Sequence[Detector]) -> dict[str, dict[str, dict[str, float]]]:
        """Per candidate name, validation metrics per validation OOD set (a combining
        candidate's combiner is fitted on the seeded fit part first and kept)."""
        plain = {d.name: d for d in candidates if not combines(d, self.backbone)}
        comb = {d.name: d for d in candidates if combines(d, self.backbone)}
        out: dict[str, dict[str, dict[str, float]]] = {}
        if plain:
            s = self.score_fn(plain, False)
            sid = s[self.id_key]
            for n in plain:
                out[n] = {o: evaluate_pair(sid[n], v[n]) for o, v in s.items() if o != self.id_key}
        if comb:
            s = self.score_fn(comb, True)
            sid = s[self.id_key]
            oods = [o for o in s if o != self.id_key]
            id_fit, id_sel = split_index(
                len(sid[next(iter(comb))]), self.combiner_fraction, self.seed, "ID validation"
            )
            idx = {
                o: split_index(
                    len(s[o][next(iter(comb))]), self.combiner_fraction, self.seed, repr(o)
                )
                for o in oods
            }
            for n, det in comb.items():
                cid, cood = sid[n], {o: s[o][n] for o in oods}
                if not all(bool(t.isfinite().all()) for t in (cid, *cood.values())):
                    # no combiner can be fitted: ranks last (NaN), counts reported
                    out[n] = {
                        o: unfittable(cid, c, len(id_sel), len(idx[o][1])) for o, c in cood.items()
                    }
                    continue
                det.fit_combiner(cid[id_fit], torch.cat([cood[o][idx[o][0]] for o in oods]))
                s_id = det.combine(cid[id_sel])
                out[n] = {
                    o: evaluate_pair(s_id, det.combine(c[idx[o][1]])) for o, c in cood.items()
                }
        return out


def select(
    search: Search,
    candidates: Sequence[Detector],
    val: Mapping[str, Mapping[str, Mapping[str, float]]],
    select_metric: str,
    backbone: OODBackbone,
    invalid: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Rows ``{params, val, val_mean[, combiner]}`` per configuration of ``search`` (an
    ``invalid`` one gets ``{params, invalid: why}`` and NaN metrics) and the index of the best
    among the fitted ``candidates``."""
    if select_metric not in METRIC_NAMES:
        raise ValueError(f"select_metric={select_metric!r} is not one of {list(METRIC_NAMES)}")
    fitted = {d.name: d for d in candidates}
    rows: list[dict[str, Any]] = []
    for combo, cand in zip(search.combos, search.candidates, strict=True):
        det = fitted.get(cand.name)
        if det is None:
            why = (invalid or {}).get(cand.name, "not fitted")
            nan = dict.fromkeys(METRIC_NAMES, math.nan)
            rows.append({"params": combo, "invalid": why, "val": {}, "val_mean": nan})
            continue
        row: dict[str, Any] = {"params": combo, "val": val[det.name]}
        row["val_mean"] = average(row["val"])
        if combines(det, backbone):
            row["combiner"] = {k: v.tolist() for k, v in det.combiner_state().items()}
        rows.append(row)
    usable = [i for i, r in enumerate(rows) if "invalid" not in r]
    if not usable:
        first = rows[0]["invalid"] if rows else "no configuration"
        raise ValueError(
            f"{search.name}: every configuration is invalid for this backbone, e.g. {first}"
        )
    best = min(usable, key=lambda i: rank_key(rows[i], select_metric, i))
    return rows, best


def detector_of(search: Search, candidates: Sequence[Detector], index: int) -> Detector:
    """The fitted candidate of configuration ``index`` of ``search``."""
    name = search.candidates[index].name
    for det in candidates:
        if det.name == name:
            return det
    raise ValueError(f"{search.name}: configuration {search.combos[index]} was not fitted")


__all__ = [
    "ID_KEY",
    "Search",
    "Validation",
    "combinations",
    "combines",
    "detector_of",
    "fit_candidates",
    "plan",
    "rank_key",
    "searches_for",
    "select",
    "split_index",
]
