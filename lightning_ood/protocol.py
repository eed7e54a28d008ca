"""The one evaluation protocol: seeded ID/OOD hold-out, per-set combiners, metrics, averages.

Pure torch (plus scikit-learn inside the layer-ensemble combiners). The OOD callback and the
grid both evaluate through these functions, so a number means the same thing everywhere:

* higher score = more in-distribution; ID is the positive class for FPR/AUPR-In (the papers'
  convention), ``fpr95_oodpos`` uses OOD as positive (OpenOOD's);
* a (detector, OOD set) pair with any non-finite score reports NaN metrics and the counts of
  the offending samples (``nonfinite_id``/``nonfinite_ood``), never a number computed around
  them; an average over sets is NaN as soon as one set is;
* the row named after a detector is the detector **as it ships**: its score (a layer
  ensemble's components combined by the combiner it carries, fitted on validation data only)
  on every reported sample, i.e. exactly what ``lightning_ood.load()`` returns;
* layer ensembles with more than one component (FSSD, Mahalanobis over several taps) also get
  the papers' protocol as a separately named row, ``<name>[per-set]`` (:func:`per_set_row`):
  a combiner fitted per OOD set on a seeded hold-out of ``per_set_holdout`` samples of the ID
  set and of that OOD set, reported on the rest (:func:`holds_out` is the one rule). It uses
  knowledge of each test set, so it is a reproduction of the papers' tables, never a
  deployable detector. With ``combiners`` (an earlier evaluation's record, e.g. of clean
  data) the per-set combiners are loaded instead of fitted, and the same samples are still
  held out: the FSSD paper's Figure 5 fits and tunes on clean data only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import Detector
from lightning_ood.engine import shipped_score
from lightning_ood.metrics import (
    CCR_NAMES,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    ccr_metrics,
    group_averages,
    ood_metrics,
)
from lightning_ood.splits import seeded_parts

#: The convention sentence every results file and table carries.
CONVENTION = (
    "higher score = more in-distribution; ID is the positive class for FPR/AUPR-In (the "
    "papers' convention); fpr95_oodpos uses OOD as positive; ccr_fpr<r> (CCR@FPR, OpenOOD's "
    "open-set accuracy) is the fraction of ALL ID test samples accepted as ID and correctly "
    "classified (prediction = argmax of the logits) at the lowest threshold accepting at most "
    "a fraction r of the OOD set (the exact ROC reading; OOD is the negative side)"
)
#: How CCR@FPR is read off the scores (``lightning_ood.metrics.ccr_metrics``'s ``method``).
CCR_METHOD = "roc"
#: Prefix of a per-group average row: ``average[near]``, ``average[far]`` (OpenOOD v1.5).
AVERAGE = "average"
#: Sample counts reported beside the metrics of every (detector, OOD set).
COUNT_KEYS = ("n_id", "n_ood", "nonfinite_id", "nonfinite_ood")
#: Suffix of the row of a layer ensemble evaluated with the papers' per-OOD-set combiners
#: (fitted on a hold-out of each test set): a protocol, never what a checkpoint ships.
PER_SET = "[per-set]"


#: ``(field, where it is set)`` names accepted for each :class:`Protocol` field besides its own:
#: the grid's ``select_metric`` argument, the callback's ``tune.select`` etc. all map here.
PROTOCOL_ALIASES: dict[str, str] = {
    "select_metric": "select",
    "tpr": "threshold_tpr",
    # the names before the per-set hold-out stopped being called "validation"
    "validation_size": "per_set_holdout",
    "validation_seed": "per_set_seed",
}


@dataclass(frozen=True)
class Protocol:
    """The one evaluation protocol value shared by ``test`` (the OOD callback), its ``tune``
    option and ``grid``: the same config gives the same selection, hold-outs and thresholds
    through every entry point.

    Attributes:
        select: validation metric that chooses hyperparameters (a key of ``METRIC_NAMES``;
            ties broken by the other of AUROC/FPR95), averaged over validation OOD sets.
        seed: seed of the (fit, select) split of every validation set for layer-ensemble
            combiners during selection (and of ``id_val_fraction``'s split).
        combiner_fraction: share of each validation set that fits a candidate's combiner
            during selection; the rest scores it.
        per_set_holdout: per reported set, samples held out (seeded) for the papers'
            per-set combiners (the ``<name>[per-set]`` rows; 0: none).
        per_set_seed: seed of that hold-out (the FSSD reference uses 42).
        threshold_tpr: ID true-positive rate of each detector's calibrated threshold.
        id_val_fraction: the ID hold-out rule. ``None`` (the default): ID validation data is
            the datamodule's held-out training split (``val_size`` > 0) and selection without
            it is refused, never taken from the reported ID test set. A fraction: an explicit
            opt-in (grid only) that selects on a seeded part of the ID test set and reports
            the rest.
    """

    select: str = "auroc"
    seed: int = 0
    combiner_fraction: float = 0.5
    per_set_holdout: int = 500
    per_set_seed: int = 42
    threshold_tpr: float = 0.95
    id_val_fraction: float | None = None

    #: Keys of the callback's ``tune`` option that are protocol fields (``detectors`` is not).
    TUNE_FIELDS: ClassVar[tuple[str, ...]] = ("select", "seed", "combiner_fraction")

    def __post_init__(self) -> None:
        check_protocol_values(dataclasses.asdict(self))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "") -> Protocol:
        """A protocol from config keys (aliases accepted: :data:`PROTOCOL_ALIASES`); errors
        name ``where`` (``"tune."``, ``"grid spec x.yaml: "``) and the key."""
        return cls().replace(where=where, **dict(options))

    def replace(self, where: str = "", **changes: Any) -> Protocol:
        """A copy with ``changes`` (field names or aliases); an unknown key is refused by
        name, every value checked (messages prefixed with ``where``)."""
        fields = {f.name for f in dataclasses.fields(self)}
        out: dict[str, Any] = {}
        for key, value in changes.items():
            name = PROTOCOL_ALIASES.get(key, key)
            if name not in fields:
                raise ValueError(
                    f"{where}{key!r} is not a protocol setting; known: {sorted(fields)} "
                    f"(aliases {PROTOCOL_ALIASES})"
                )
            out[name] = value
        merged = {**dataclasses.asdict(self), **out}
        check_protocol_values(merged, where)
        return dataclasses.replace(self, **out)

    def record(self) -> dict[str, Any]:
        """The protocol as plain values, for results files."""
        return dataclasses.asdict(self)


def check_protocol_values(values: Mapping[str, Any], where: str = "") -> None:
    """Refuse a protocol value by name (``where`` prefixes the key: ``tune.select=...``)."""
    if values["select"] not in METRIC_NAMES:
        raise ValueError(f"{where}select={values['select']!r} is not one of {list(METRIC_NAMES)}")
    if not 0.0 < float(values["combiner_fraction"]) < 1.0:
        raise ValueError(
            f"{where}combiner_fraction must lie in (0, 1), got {values['combiner_fraction']}"
        )
    frac = values.get("id_val_fraction")
    if frac is not None and not 0.0 < float(frac) < 1.0:
        raise ValueError(f"{where}id_val_fraction must lie in (0, 1) or be null, got {frac}")
    if int(values["per_set_holdout"]) < 0:
        raise ValueError(f"{where}per_set_holdout must be >= 0, got {values['per_set_holdout']}")
    if not 0.0 < float(values["threshold_tpr"]) <= 1.0:
        raise ValueError(f"{where}threshold_tpr must lie in (0, 1], got {values['threshold_tpr']}")
    for key in ("seed", "per_set_seed"):
        if isinstance(values[key], bool) or not isinstance(values[key], int):
            raise ValueError(f"{where}{key} must be an integer, got {values[key]!r}")


#: Keys of the OOD callback's ``tune`` option.
TUNE_KEYS = ("detectors", *Protocol.TUNE_FIELDS)


def check_tune(tune: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate the callback's ``tune`` option at config time and fill its defaults (the
    protocol fields from :class:`Protocol`'s)."""
    if tune is None:
        return None
    if not isinstance(tune, Mapping):
        raise ValueError(f"tune must be a mapping with keys {list(TUNE_KEYS)}, got {tune!r}")
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise ValueError(f"tune: unknown keys {unknown}; allowed: {list(TUNE_KEYS)}")
    defaults = Protocol()
    out = {"detectors": None, **{k: getattr(defaults, k) for k in Protocol.TUNE_FIELDS}, **tune}
    check_protocol_values({**dataclasses.asdict(defaults), **out}, "tune.")
    dets = out["detectors"]
    if isinstance(dets, list | tuple):
        dets = dict.fromkeys(dets)
    if dets is not None and not isinstance(dets, Mapping):
        raise ValueError(f"tune.detectors must map detector names to grids, got {dets!r}")
    out["detectors"] = None if dets is None else dict(dets)
    return out


def per_set_row(detector: str) -> str:
    """The name of ``detector``'s per-set-combiner row, e.g. ``fssd[per-set]``."""
    return f"{detector}{PER_SET}"


def group_row(group: str) -> str:
    """The name of a group's average row, e.g. ``average[near]``."""
    return f"{AVERAGE}[{group}]"


def is_average_row(name: str) -> bool:
    """Whether a row of a detector's metrics is an average (overall or a group's), not a set."""
    return name == AVERAGE or (name.startswith(f"{AVERAGE}[") and name.endswith("]"))


def evaluate_pair(
    s_id: Tensor, s_ood: Tensor, correct_id: Tensor | None = None
) -> dict[str, float]:
    """Metrics of one (detector, OOD set) plus :data:`COUNT_KEYS`; NaN metrics when any
    score is non-finite (reported, never folded into a number).

    ``correct_id``: per ID sample (the order of ``s_id``), whether the classifier's prediction
    equals its label; given, the CCR@FPR keys (:data:`~lightning_ood.metrics.CCR_NAMES`, read
    as :data:`CCR_METHOD`) are added.
    """
    bad_id = int((~torch.isfinite(s_id)).sum())
    bad_ood = int((~torch.isfinite(s_ood)).sum())
    counts = {"n_id": len(s_id), "n_ood": len(s_ood), "nonfinite_id": bad_id}
    counts["nonfinite_ood"] = bad_ood
    ccr_keys = CCR_NAMES if correct_id is not None else ()
    if bad_id or bad_ood:
        return {**dict.fromkeys((*METRIC_NAMES, *ccr_keys), math.nan), **counts}
    ccr = {} if correct_id is None else ccr_metrics(s_id, s_ood, correct_id, method=CCR_METHOD)
    return {**ood_metrics(s_id, s_ood), **ccr, **counts}


def average(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of every metric over sets (CCR@FPR's too where every set holds them); NaN if any
    set is NaN (a broken set must not vanish from a mean)."""
    if not per_set:
        return dict.fromkeys(METRIC_NAMES, math.nan)
    ccr = [k for k in CCR_NAMES if all(k in v for v in per_set.values())]
    return {m: sum(v[m] for v in per_set.values()) / len(per_set) for m in (*METRIC_NAMES, *ccr)}


def averages(
    per_set: Mapping[str, Mapping[str, float]], groups: Mapping[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """The ``average`` row over every set of ``per_set`` and, for ``groups`` (``{OOD set:
    group}``), each group's ``average[group]`` row (:func:`lightning_ood.metrics.group_averages`:
    the plain mean over its sets, OpenOOD v1.5's near/far rows)."""
    out = {AVERAGE: average(per_set)}
    for group, row in group_averages(per_set, groups or {}).items():
        out[group_row(group)] = row
    return out


def holds_out(det: Detector, num_components: int, per_set_holdout: int) -> bool:
    """Whether ``det`` gets a ``[per-set]`` row on a hold-out: it fits a combiner of
    ``num_components > 1`` components on held-out samples of each test set (a single
    component needs no combiner) and ``per_set_holdout > 0``."""
    return per_set_holdout > 0 and det.has_combiner and num_components > 1


def check_holdout(
    sizes: Mapping[str, int], per_set_holdout: int, detectors: Mapping[str, Detector]
) -> None:
    """Refuse, before any pass over the data, a hold-out the sets or the combiners cannot
    take: every set needs more than ``per_set_holdout`` samples, and each detector's combiner
    its ``min_per_set_holdout`` samples per set."""
    for name, det in detectors.items():
        least = int(getattr(det, "min_per_set_holdout", 1))
        if per_set_holdout < least:
            raise ValueError(
                f"per_set_holdout={per_set_holdout} is too small for detector {name!r}: its "
                f"combiner ({getattr(det, 'combiner', '?')!r}) needs at least {least} held-out "
                f"samples per set; raise per_set_holdout to >= {least}"
            )
    for set_name, n in sizes.items():
        if n <= per_set_holdout:
            raise ValueError(
                f"test set {set_name!r} has {n} samples but per_set_holdout={per_set_holdout} "
                f"are held out for the layer-ensemble combiners of {sorted(detectors)}; lower "
                "`per_set_holdout` or use more samples"
            )


def holdout_splits(
    sizes: Mapping[str, int], per_set_holdout: int, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per set, the seeded ``(held-out, reported)`` index split (``per_set_holdout`` held out;
    the same samples on any world size)."""
    check_holdout(sizes, per_set_holdout, {})
    return {
        name: tuple(seeded_parts(n, [per_set_holdout], seed, f"test set {name!r}"))  # type: ignore[misc]
        for name, n in sizes.items()
    }


def unfittable(
    components_id: Tensor, components_ood: Tensor, n_id: int, n_ood: int, ccr: bool = False
) -> dict:
    """The result of a (detector, set) whose combiner cannot be fitted because components
    are non-finite: NaN metrics (CCR@FPR's too with ``ccr``), the reported sizes
    ``n_id``/``n_ood``, and how many samples of each set have a non-finite component."""

    def bad(t: Tensor) -> int:
        return int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())

    counts = {"n_id": n_id, "n_ood": n_ood, "nonfinite_id": bad(components_id)}
    counts["nonfinite_ood"] = bad(components_ood)
    names = (*METRIC_NAMES, *(CCR_NAMES if ccr else ()))
    return {**dict.fromkeys(names, math.nan), **counts}


def _warn_nonfinite(
    warn: Callable[[str], None] | None,
    detector: str,
    ood: str,
    vals: Mapping[str, float],
    n_id: int,
    n_ood: int,
) -> None:
    if warn is not None and vals["nonfinite_id"] + vals["nonfinite_ood"]:
        warn(
            f"detector {detector!r} produced non-finite scores on {ood!r}: "
            f"{vals['nonfinite_id']} of {n_id} ID and {vals['nonfinite_ood']} of {n_ood} OOD; "
            "its metrics for this set are reported as NaN."
        )


#: A per-set combiner record, as :attr:`Evaluation.combiners` writes it (a layer ensemble's
#: ``combiner_state()`` as lists): one value per component, scalars, and the fitted flag.
COMBINER_VECTORS = ("combiner_coef", "combiner_mean", "combiner_scale")
COMBINER_SCALARS = ("combiner_intercept",)
COMBINER_FLAG = "combiner_fitted"
COMBINER_FIELDS = (*COMBINER_VECTORS, *COMBINER_SCALARS, COMBINER_FLAG)
_COMBINERS_FIX = (
    "give the ood_results.json that `lightning-ood test` wrote for a run of the same "
    "layer-ensemble detectors with per_set_holdout > 0, unedited (or drop the fixed combiners "
    "to fit them on this run's hold-out)"
)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_combiner_record(
    state: Any, num_components: int, source: str, detector: str, ood: str
) -> None:
    """Refuse a per-set combiner record that is not exactly what a fitted combiner writes:
    the :data:`COMBINER_FIELDS`, ``combiner_fitted`` true (false means no combiner was fitted:
    its score would be the single default layer, not the ensemble), finite numbers,
    ``num_components`` per vector, positive scales. Messages name ``source`` (the file) and
    the ``detector``/``ood`` key."""
    where = f"{source}: combiners[{detector!r}][{ood!r}]"
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{where} must be a mapping of {list(COMBINER_FIELDS)}, got "
            f"{type(state).__name__}; {_COMBINERS_FIX}"
        )
    missing = [k for k in COMBINER_FIELDS if k not in state]
    unknown = sorted(str(k) for k in set(state) - set(COMBINER_FIELDS))
    if missing or unknown:
        wrong = [f"lacks {missing}"] if missing else []
        wrong += [f"has unknown fields {unknown}"] if unknown else []
        raise ValueError(
            f"{where} {' and '.join(wrong)}; a combiner record holds exactly "
            f"{list(COMBINER_FIELDS)}; {_COMBINERS_FIX}"
        )
    if state[COMBINER_FLAG] is not True:
        why = (
            "is false: that run fitted no combiner here, and its weights would report the "
            "single default layer as the ensemble"
            if state[COMBINER_FLAG] is False
            else f"must be true, got {state[COMBINER_FLAG]!r}"
        )
        raise ValueError(f"{where}.{COMBINER_FLAG} {why}; {_COMBINERS_FIX}")
    for key in COMBINER_SCALARS:
        if not _finite_number(state[key]):
            raise ValueError(
                f"{where}.{key} must be a finite number, got {state[key]!r}; {_COMBINERS_FIX}"
            )
    for key in COMBINER_VECTORS:
        value = state[key]
        if not isinstance(value, list | tuple) or not all(_finite_number(v) for v in value):
            raise ValueError(
                f"{where}.{key} must be a list of {num_components} finite numbers (one per "
                f"component), got {value!r}; {_COMBINERS_FIX}"
            )
        if len(value) != num_components:
            what, unit = (
                ("the combiner", "weights") if key == COMBINER_VECTORS[0] else (key, "values")
            )
            raise ValueError(
                f"{source}: {what} of {detector!r} for {ood!r} has {len(value)} {unit}, but "
                f"{detector!r} has {num_components} components here; use a run with the same "
                "taps and members"
            )
        if key == "combiner_scale" and not all(v > 0 for v in value):
            raise ValueError(
                f"{where}.combiner_scale must be positive (a standard deviation, 1 without "
                f"standardisation), got {value!r}; {_COMBINERS_FIX}"
            )


def fixed_combiners(
    combiners: Mapping[str, Mapping[str, Mapping[str, Any]]],
    source: str,
    components: Mapping[str, int],
    detector_names: Sequence[str],
    ood_names: Sequence[str],
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """Check and convert fixed combiners (an earlier run's ``combiners`` record) before
    anything is evaluated: one per held-out detector (``components``: its number of
    components) and OOD set, each a complete fitted record (:func:`check_combiner_record`),
    and none for a detector of ``detector_names`` that is not held out (it would be silently
    unused). Every error names ``source`` (the file) and the detector/set key."""
    if not isinstance(combiners, Mapping):
        raise ValueError(
            f"{source}: combiners must map detector names to {{OOD set: combiner}}, got "
            f"{type(combiners).__name__}; {_COMBINERS_FIX}"
        )
    unused = sorted(set(combiners) & set(detector_names) - set(components))
    if unused:
        raise ValueError(
            f"{source} gives combiners for {unused}, which are not evaluated on a hold-out "
            "here (per_set_holdout 0, or a single component): the combiners would be unused"
        )
    for d in components:
        if d in combiners and not isinstance(combiners[d], Mapping):
            raise ValueError(
                f"{source}: combiners[{d!r}] must map OOD set names to combiner records, got "
                f"{type(combiners[d]).__name__}; {_COMBINERS_FIX}"
            )
    missing = [f"{d}/{o}" for d in components for o in ood_names if o not in combiners.get(d, {})]
    if missing:
        raise ValueError(
            f"{source} has no combiner for {missing} (detector/OOD set); it must come from a "
            "run with the same layer-ensemble detectors and OOD set names"
        )
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    for d, k in components.items():
        for o in ood_names:
            state = combiners[d][o]
            check_combiner_record(state, k, source, d, o)
            out.setdefault(d, {})[o] = {  # float64 from JSON: float32 would perturb the weights
                key: torch.as_tensor(v, dtype=torch.bool if key == COMBINER_FLAG else torch.float64)
                for key, v in state.items()
            }
    return out


def combiners_record(path: str, per_set_holdout: int, per_set_seed: int) -> dict[str, Any]:
    """The ``combiners`` record of an earlier run's ``ood_results.json`` (the callback's
    ``combiners_from``), refused unless its hold-out is this run's (``per_set_holdout``,
    ``per_set_seed``), so that its combiners saw none of the samples reported here. The
    records themselves are checked by :func:`fixed_combiners`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"combiners_from={path!r} does not exist; give the ood_results.json of the run "
            "whose combiners to reuse (e.g. the same model's run on clean data)"
        )
    fix = (
        "give the ood_results.json that `lightning-ood test` wrote for the run whose "
        "combiners to reuse, unedited"
    )
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"combiners_from={path!r} is not JSON ({err}); {fix}") from err
    combiners = record.get("combiners") if isinstance(record, dict) else None
    held = record.get("validation") if isinstance(record, dict) else None
    if not isinstance(combiners, dict) or not isinstance(held, dict):
        raise ValueError(
            f"combiners_from={path!r} is not an ood_results.json of lightning-ood test "
            "(it needs a 'combiners' and a 'validation' mapping); " + fix
        )
    for key, kind in (("held_out_per_set", "an integer >= 0"), ("seed", "an integer")):
        value = held.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or (key != "seed" and value < 0):
            raise ValueError(
                f"combiners_from={path!r}: validation.{key} must be {kind}, got {value!r}; " + fix
            )
    ours = (per_set_holdout, per_set_seed)
    theirs = (held.get("held_out_per_set"), held.get("seed"))
    if not theirs[0]:
        raise ValueError(
            f"combiners_from={path!r} held out no samples, so it fitted no per-set "
            "combiners: give a run of layer ensembles with per_set_holdout > 0"
        )
    if theirs != ours:
        raise ValueError(
            f"combiners_from={path!r} held out {theirs[0]} samples per set with seed "
            f"{theirs[1]}, this run per_set_holdout={ours[0]}, per_set_seed={ours[1]}: "
            "set them to the earlier run's, so that its combiners see none of the samples "
            "reported here"
        )
    return combiners


@dataclass
class Evaluation:
    """What :func:`evaluate_detectors` measured.

    Attributes:
        metrics: ``{detector: {ood_set: metrics + counts, "average": metrics}}``.
        scores: ``{detector: {ood_set: (reported ID scores, reported OOD scores)}}`` (for
            figures).
        combiners: ``{detector: {ood_set: combiner state as lists}}`` (layer ensembles with a
            hold-out only), fitted here or loaded from the ``combiners`` argument.
        held_out_per_set: samples held out of every set for ``held_out_for`` (0: none).
        held_out_for: the detectors evaluated on the hold-out's remainder.
        groups: ``{OOD set: group}`` of the ``average[group]`` rows.
        ccr: whether the rows hold CCR@FPR (the ID test set's correctness was given).
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    scores: dict[str, dict[str, tuple[Tensor, Tensor]]]
    combiners: dict[str, dict[str, Any]] = field(default_factory=dict)
    held_out_per_set: int = 0
    held_out_for: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    ccr: bool = False


def evaluate_detectors(
    detectors: Mapping[str, Detector],
    banks: Mapping[str, Sequence[Tensor]],
    set_names: Sequence[str],
    *,
    per_set_holdout: int = 0,
    seed: int = 42,
    warn: Callable[[str], None] | None = None,
    combiners: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    combiners_source: str = "combiners",
    correct_id: Tensor | None = None,
    groups: Mapping[str, str] | None = None,
) -> Evaluation:
    """Evaluate every detector on ``set_names[0]`` (ID) against each other set (OOD).

    Args:
        detectors: the detectors the banks were scored with.
        banks: ``{detector: [scores of set 0, set 1, ...]}`` in dataset order, (N,) scores,
            or (N, K) components for layer ensembles (``score_batch(components=True)``).
        set_names: ID set name, then the OOD set names.
        per_set_holdout: samples held out of every set to fit the layer-ensemble combiners
            (for the detectors :func:`holds_out` names; the others report every sample).
        seed: seed of the hold-out permutation (the FSSD reference uses 42).
        warn: called with a message for every (detector, set) with non-finite scores.
        combiners: fixed combiners ``{detector: {ood_set: state}}`` in the form of
            :attr:`Evaluation.combiners` (an earlier run's ``ood_results.json`` ``combiners``):
            loaded, never fitted; every held-out detector needs one per OOD set with as many
            weights as it has components. ``None``: fit them on the hold-out.
        combiners_source: where ``combiners`` came from, for error messages (a file path).
        correct_id: (N_ID,) bool, per ID sample in dataset order, whether the prediction
            equals the label: the rows then hold CCR@FPR (a held-out row indexes it like the
            ID scores). None (no labels): no CCR key.
        groups: ``{OOD set: group}``: every detector also gets ``average[group]`` rows.

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
    if correct_id is not None:
        correct_id = correct_id.reshape(-1).bool().cpu()
        if len(correct_id) != sizes.get(id_name, len(correct_id)):
            raise ValueError(
                f"correct_id has {len(correct_id)} entries but the ID set {id_name!r} has "
                f"{sizes[id_name]} scores; pass (prediction == label) of every ID sample in "
                "dataset order"
            )
    held_out_for = [
        n
        for n, d in detectors.items()
        if holds_out(d, banks[n][0].shape[1] if banks[n][0].ndim == 2 else 1, per_set_holdout)
    ]
    fixed = None
    if combiners is not None:
        components = {n: banks[n][0].shape[1] for n in held_out_for}
        fixed = fixed_combiners(combiners, combiners_source, components, list(detectors), ood_names)
    splits: dict[str, tuple[Tensor, Tensor]] = {}
    if held_out_for:
        check_holdout(sizes, per_set_holdout, {n: detectors[n] for n in held_out_for})
        splits = holdout_splits(sizes, per_set_holdout, seed)

    def held(t: Tensor, set_name: str) -> Tensor:
        return t[splits[set_name][0]]

    result = Evaluation({}, {}, {}, per_set_holdout if held_out_for else 0, held_out_for)
    result.groups, result.ccr = dict(groups or {}), correct_id is not None
    for dname, det in detectors.items():
        bank = dict(zip(set_names, banks[dname], strict=True))
        _shipped_row(result, dname, det, bank, id_name, ood_names, warn, correct_id)
        if dname not in held_out_for:
            continue
        row = per_set_row(dname)
        deployed = det.combiner_state()
        per_set: dict[str, dict[str, float]] = {}
        result.scores[row] = {}
        try:
            for ood in ood_names:
                s_id, s_ood = bank[id_name][splits[id_name][1]], bank[ood][splits[ood][1]]
                fit_id, fit_ood = bank[id_name][splits[id_name][0]], bank[ood][splits[ood][0]]
                if fixed is not None:
                    det.load_combiner_state(fixed[dname][ood])
                elif not all(bool(t.isfinite().all()) for t in (fit_id, fit_ood)):
                    # no combiner can be fitted on non-finite components: NaN, reported
                    per_set[ood] = unfittable(
                        bank[id_name], bank[ood], len(s_id), len(s_ood), result.ccr
                    )
                    result.scores[row][ood] = (s_id[:, 0], s_ood[:, 0])
                    _warn_nonfinite(
                        warn, row, ood, per_set[ood], len(bank[id_name]), len(bank[ood])
                    )
                    continue
                if fixed is None:
                    det.fit_combiner(fit_id, fit_ood)
                result.combiners.setdefault(dname, {})[ood] = {
                    k: v.tolist() for k, v in det.combiner_state().items()
                }
                s_id, s_ood = det.combine(s_id), det.combine(s_ood)
                kept = None if correct_id is None else correct_id[splits[id_name][1]]
                per_set[ood] = evaluate_pair(s_id, s_ood, kept)
                result.scores[row][ood] = (s_id, s_ood)
                _warn_nonfinite(warn, row, ood, per_set[ood], len(s_id), len(s_ood))
        finally:
            det.load_combiner_state(deployed)
        per_set.update(averages({o: per_set[o] for o in ood_names}, result.groups))
        result.metrics[row] = per_set
    return result


def rank_key(row: Mapping[str, Any], select: str, index: int) -> tuple[float, ...]:
    """The one selection rule (tuning, grid, per-set selection), as a sort key of a candidate's
    ``row["val_mean"]`` metrics: smaller is better; NaN last, then the selection metric, the
    other of AUROC/FPR95 as tie-breaker, then the candidate's order."""
    second = "auroc" if select != "auroc" else "fpr95"
    primary, tie = row["val_mean"][select], row["val_mean"][second]
    if math.isnan(primary):
        return (1.0, 0.0, 0.0, float(index))
    p = primary if select in LOWER_IS_BETTER else -primary
    t = tie if second in LOWER_IS_BETTER else -tie
    return (0.0, p, math.inf if math.isnan(t) else t, float(index))


#: The three parts of every set in the papers' per-set selection protocol, in order.
PER_SET_PARTS = ("combiner", "selection", "reported")


def per_set_parts(
    sizes: Mapping[str, int], combiner_size: int, selection_size: int, seed: int
) -> dict[str, dict[str, Tensor]]:
    """Per set, the seeded index parts of :data:`PER_SET_PARTS`: the first ``combiner_size``
    samples of the permutation that :func:`holdout_splits` draws (so the combiner part is the
    per-set rows' hold-out), the next ``selection_size``, and the rest (reported)."""
    return {
        name: dict(
            zip(
                PER_SET_PARTS,
                seeded_parts(n, [combiner_size, selection_size], seed, f"test set {name!r}"),
                strict=True,
            )
        )
        for name, n in sizes.items()
    }


@dataclass
class PerSetSelection:
    """What :func:`per_set_selected` measured for one family of candidates.

    Attributes:
        metrics: ``{ood_set: metrics + counts of the chosen candidate on the reported parts,
            average rows...}``: one ``<name>[per-set]`` row.
        choices: ``{ood_set: {"candidate", "index", "val" (its selection metrics),
            "combiner" (the chosen candidate's per-set combiner, as lists; layer ensembles)}}``.
    """

    metrics: dict[str, dict[str, float]]
    choices: dict[str, dict[str, Any]]


def per_set_selected(
    candidates: Sequence[Detector],
    score: Callable[[Detector, str, str], Tensor],
    id_name: str,
    ood_names: Sequence[str],
    *,
    select: str = "auroc",
    groups: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PerSetSelection:
    """The papers' per-set protocol with selection (Lee et al. 2018 §3; the FSSD paper's
    Table 2): per OOD set, every candidate (e.g. one per input pre-processing magnitude ε)
    fits its combiner on the ``"combiner"`` parts of the ID set and of that OOD set (layer
    ensembles; :func:`holds_out` is the rule), is measured on the ``"selection"`` parts, and
    the best by ``select`` (:func:`rank_key`) alone is reported on the ``"reported"`` parts.

    It uses samples of each test set, so its row is the papers' reproduction, never a
    deployable detector (the shipped row is :func:`evaluate_detectors`'). The candidates'
    own (deployed) combiners are restored afterwards.

    Args:
        candidates: fitted detectors, one per configuration, in order (ties go to the first).
        score: ``score(candidate, set name, part)`` -> (N,) scores or (N, K) components of
            that part (:data:`PER_SET_PARTS`, e.g. from :func:`per_set_parts`); each distinct
            call is made once (the ID parts serve every OOD set), and the ``"reported"`` parts
            only for the chosen candidates.
        id_name, ood_names: the ID set and the OOD sets.
        select: selection metric (a key of ``METRIC_NAMES``).
        groups: ``{OOD set: group}`` of the ``average[group]`` rows.
        warn: called for every set whose reported scores are not finite.
    """
    if select not in METRIC_NAMES:
        raise ValueError(f"select={select!r} is not one of {list(METRIC_NAMES)}")
    if not candidates:
        raise ValueError("per_set_selected: no candidates to select from")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"per_set_selected: candidate names must be unique, got {names}")
    memo: dict[tuple[str, str, str], Tensor] = {}

    def part(det: Detector, set_name: str, which: str) -> Tensor:
        key = (det.name, set_name, which)
        if key not in memo:
            memo[key] = score(det, set_name, which).detach().cpu()
        return memo[key]

    def combining(det: Detector, t: Tensor) -> bool:
        return holds_out(det, t.shape[1] if t.ndim == 2 else 1, 1)

    def measured(det: Detector, ood: str, which: str) -> tuple[Tensor, Tensor]:
        """The (ID, OOD) scores of part ``which``, combined by a combiner fitted on the
        combiner parts of the ID set and of ``ood`` (NaN when it cannot be fitted)."""
        s_id, s_ood = part(det, id_name, which), part(det, ood, which)
        if not combining(det, s_id):
            return s_id.reshape(len(s_id), -1)[:, 0], s_ood.reshape(len(s_ood), -1)[:, 0]
        fit_id, fit_ood = part(det, id_name, "combiner"), part(det, ood, "combiner")
        if not all(bool(t.isfinite().all()) for t in (fit_id, fit_ood)):
            nan = torch.full((len(s_id),), math.nan, dtype=torch.float64)
            return nan, torch.full((len(s_ood),), math.nan, dtype=torch.float64)
        det.fit_combiner(fit_id, fit_ood)
        return det.combine(s_id), det.combine(s_ood)

    deployed = {c.name: c.combiner_state() for c in candidates}
    out = PerSetSelection({}, {})
    try:
        for ood in ood_names:
            rows = [{"val_mean": evaluate_pair(*measured(c, ood, "selection"))} for c in candidates]
            best = min(range(len(rows)), key=lambda i: rank_key(rows[i], select, i))
            chosen = candidates[best]
            s_id, s_ood = measured(chosen, ood, "reported")
            out.metrics[ood] = evaluate_pair(s_id, s_ood)
            _warn_nonfinite(warn, per_set_row(chosen.name), ood, out.metrics[ood], len(s_id),
                            len(s_ood))  # fmt: skip
            choice: dict[str, Any] = {"candidate": chosen.name, "index": best}
            choice["val"] = {k: v for k, v in rows[best]["val_mean"].items()}
            if combining(chosen, part(chosen, id_name, "reported")):
                choice["combiner"] = {k: v.tolist() for k, v in chosen.combiner_state().items()}
            out.choices[ood] = choice
    finally:
        for c in candidates:
            c.load_combiner_state(deployed[c.name])
    out.metrics.update(averages({o: out.metrics[o] for o in ood_names}, groups))
    return out


def _shipped_row(
    result: Evaluation,
    dname: str,
    det: Detector,
    bank: Mapping[str, Tensor],
    id_name: str,
    ood_names: Sequence[str],
    warn: Callable[[str], None] | None,
    correct_id: Tensor | None = None,
) -> None:
    """The row named after the detector: its score as it ships (a layer ensemble's components
    combined by its own combiner), on every sample: what ``lightning_ood.load()`` returns."""

    s_id = shipped_score(det, bank[id_name])
    per_set: dict[str, dict[str, float]] = {}
    result.scores[dname] = {}
    for ood in ood_names:
        s_ood = shipped_score(det, bank[ood])
        per_set[ood] = evaluate_pair(s_id, s_ood, correct_id)
        result.scores[dname][ood] = (s_id, s_ood)
        _warn_nonfinite(warn, dname, ood, per_set[ood], len(s_id), len(s_ood))
    per_set.update(averages({o: per_set[o] for o in ood_names}, result.groups))
    result.metrics[dname] = per_set


__all__ = [
    "AVERAGE",
    "CCR_METHOD",
    "COMBINER_FIELDS",
    "CONVENTION",
    "COUNT_KEYS",
    "PER_SET",
    "PER_SET_PARTS",
    "PROTOCOL_ALIASES",
    "TUNE_KEYS",
    "Evaluation",
    "PerSetSelection",
    "Protocol",
    "average",
    "averages",
    "check_combiner_record",
    "check_holdout",
    "check_protocol_values",
    "check_tune",
    "combiners_record",
    "evaluate_detectors",
    "evaluate_pair",
    "fixed_combiners",
    "group_row",
    "holdout_splits",
    "holds_out",
    "is_average_row",
    "per_set_parts",
    "per_set_row",
    "per_set_selected",
    "rank_key",
    "unfittable",
]
