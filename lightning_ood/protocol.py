"""The one evaluation protocol: seeded ID/OOD hold-out, per-set combiners, metrics, averages.

Pure torch (plus scikit-learn inside the layer-ensemble combiners). The OOD callback and the
grid both evaluate through these functions, so a number means the same thing everywhere:

* higher score = more in-distribution; ID is the positive class for FPR/AUPR-In (the papers'
  convention), ``fpr95_oodpos`` uses OOD as positive (OpenOOD's);
* a (detector, OOD set) pair with any non-finite score reports NaN metrics and the counts of
  the offending samples (``nonfinite_id``/``nonfinite_ood``), never a number computed around
  them; an average over sets is NaN as soon as one set is;
* layer ensembles (FSSD, Mahalanobis) fit their combiner per OOD set on a seeded hold-out of
  ``validation_size`` samples of the ID set and of that OOD set; held-out samples are never
  reported, for any detector, so every row of a table is scored on the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector
from lightning_ood.metrics import METRIC_NAMES, ood_metrics
from lightning_ood.splits import seeded_parts

#: The convention sentence every results file and table carries.
CONVENTION = (
    "higher score = more in-distribution; ID is the positive class for FPR/AUPR-In (the "
    "papers' convention); fpr95_oodpos uses OOD as positive"
)
#: Sample counts reported beside the metrics of every (detector, OOD set).
COUNT_KEYS = ("n_id", "n_ood", "nonfinite_id", "nonfinite_ood")


def evaluate_pair(s_id: Tensor, s_ood: Tensor) -> dict[str, float]:
    """Metrics of one (detector, OOD set) plus :data:`COUNT_KEYS`; NaN metrics when any
    score is non-finite (reported, never folded into a number)."""
    bad_id = int((~torch.isfinite(s_id)).sum())
    bad_ood = int((~torch.isfinite(s_ood)).sum())
    counts = {"n_id": len(s_id), "n_ood": len(s_ood), "nonfinite_id": bad_id}
    counts["nonfinite_ood"] = bad_ood
    if bad_id or bad_ood:
        return {**dict.fromkeys(METRIC_NAMES, math.nan), **counts}
    return {**ood_metrics(s_id, s_ood), **counts}


def average(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over sets; NaN if any set is NaN (a broken set must not vanish
    from a mean)."""
    if not per_set:
        return dict.fromkeys(METRIC_NAMES, math.nan)
    return {m: sum(v[m] for v in per_set.values()) / len(per_set) for m in METRIC_NAMES}


def holdout_splits(
    sizes: Mapping[str, int], validation_size: int, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per set, the seeded ``(held-out, reported)`` index split (``validation_size`` held out;
    the same samples on any world size)."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, n in sizes.items():
        if n <= validation_size:
            raise ValueError(
                f"test set {name!r} has {n} samples but validation_size={validation_size} are "
                "held out for the layer-ensemble fit; lower `validation_size` or use more "
                "samples"
            )
        held, rest = seeded_parts(n, [validation_size], seed, f"test set {name!r}")
        out[name] = (held, rest)
    return out


def needs_holdout(detectors: Mapping[str, Detector], validation_size: int) -> bool:
    """Whether the protocol holds samples out: a layer ensemble is configured and
    ``validation_size > 0``."""
    return validation_size > 0 and any(d.needs_validation for d in detectors.values())


@dataclass
class Evaluation:
    """What :func:`evaluate_detectors` measured.

    Attributes:
        metrics: ``{detector: {ood_set: metrics + counts, "average": metrics}}``.
        scores: ``{detector: {ood_set: (reported ID scores, reported OOD scores)}}`` (for
            figures).
        combiners: ``{detector: {ood_set: fitted combiner state as lists}}`` (layer ensembles
            with a hold-out only).
        held_out_per_set: samples held out of every set (0 without a hold-out).
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    scores: dict[str, dict[str, tuple[Tensor, Tensor]]]
    combiners: dict[str, dict[str, Any]] = field(default_factory=dict)
    held_out_per_set: int = 0


def evaluate_detectors(
    detectors: Mapping[str, Detector],
    banks: Mapping[str, Sequence[Tensor]],
    set_names: Sequence[str],
    *,
    validation_size: int = 0,
    seed: int = 42,
    warn: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate every detector on ``set_names[0]`` (ID) against each other set (OOD).

    Args:
        detectors: the detectors the banks were scored with.
        banks: ``{detector: [scores of set 0, set 1, ...]}`` in dataset order, (N,) scores,
            or (N, K) components for layer ensembles (``score_batch(components=True)``).
        set_names: ID set name, then the OOD set names.
        validation_size: samples held out of every set to fit the layer-ensemble combiners
            (only when a layer ensemble is configured, see :func:`needs_holdout`).
        seed: seed of the hold-out permutation (the FSSD reference uses 42).
        warn: called with a message for every (detector, set) with non-finite scores.

    The model's own (deployed) combiners are restored afterwards: per-set combiners are an
    evaluation protocol, not the detector's state.
    """
    id_name, ood_names = set_names[0], list(set_names[1:])
    sizes: dict[str, int] = {}
    for dname, per_set in banks.items():
        if len(per_set) != len(set_names):
            raise ValueError(
                f"detector {dname!r} has scores for {len(per_set)} sets, expected "
                f"{len(set_names)} ({list(set_names)})"
            )
        for set_name, t in zip(set_names, per_set, strict=True):
            if len(t) == 0:
                raise ValueError(
                    f"test set {set_name!r} produced no samples; check its path/subset"
                )
            sizes[set_name] = len(t)
    holdout = needs_holdout(detectors, validation_size)
    splits = holdout_splits(sizes, validation_size, seed) if holdout else {}

    def reported(t: Tensor, set_name: str) -> Tensor:
        return t[splits[set_name][1]] if holdout else t

    def held(t: Tensor, set_name: str) -> Tensor:
        return t[splits[set_name][0]]

    result = Evaluation({}, {}, {}, validation_size if holdout else 0)
    for dname, det in detectors.items():
        bank = dict(zip(set_names, banks[dname], strict=True))
        deployed = det.combiner_state()
        per_set: dict[str, dict[str, float]] = {}
        result.scores[dname] = {}
        try:
            for ood in ood_names:
                s_id, s_ood = reported(bank[id_name], id_name), reported(bank[ood], ood)
                if det.needs_validation:
                    if holdout:
                        det.fit_combiner(held(bank[id_name], id_name), held(bank[ood], ood))
                        result.combiners.setdefault(dname, {})[ood] = {
                            k: v.tolist() for k, v in det.combiner_state().items()
                        }
                    s_id, s_ood = det.combine(s_id), det.combine(s_ood)
                per_set[ood] = evaluate_pair(s_id, s_ood)
                result.scores[dname][ood] = (s_id, s_ood)
                bad = per_set[ood]["nonfinite_id"] + per_set[ood]["nonfinite_ood"]
                if bad and warn is not None:
                    warn(
                        f"detector {dname!r} produced non-finite scores on {ood!r}: "
                        f"{per_set[ood]['nonfinite_id']} of {len(s_id)} ID and "
                        f"{per_set[ood]['nonfinite_ood']} of {len(s_ood)} OOD; its metrics for "
                        "this set are reported as NaN."
                    )
        finally:
            det.load_combiner_state(deployed)
        per_set["average"] = average({o: per_set[o] for o in ood_names})
        result.metrics[dname] = per_set
    return result


__all__ = [
    "CONVENTION",
    "COUNT_KEYS",
    "Evaluation",
    "average",
    "evaluate_detectors",
    "evaluate_pair",
    "holdout_splits",
    "needs_holdout",
]
