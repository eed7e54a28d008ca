"""Hyperparameter grids for post-hoc detectors: the evaluation session over cached features.

Every combination of a grid (e.g. LINe's δ × p_a × p_w) is fitted from the cached training
features and scored on cached validation sets; no network pass is repeated. The run is
:class:`lightning_ood.session.EvaluationSession` with :class:`~lightning_ood.session.CachedSource`
sets and the one shared :class:`~lightning_ood.protocol.Protocol` (read from the config's OOD
callback by ``lightning-ood grid``), so the selection metric, the seeds, the hold-out rule, the
shipped combiner and the threshold are those of ``lightning-ood test`` with ``tune``: the same
config reports the same numbers through both. Selection data and reported data never overlap:

* OOD: a validation OOD set may not read any sample of a reported test OOD set, nor of the
  Outlier Exposure set the checkpoint's network was trained with (compared by what is read:
  kind, location, split, slice; never by name; refused);
* ID: selection reads the datamodule's held-out training images (``val_size``), which may not
  include any image the checkpoint's network was trained on (its recorded training split;
  refused); with ``val_size`` 0 the grid is refused (as ``tune`` is) unless the spec opts in
  to a seeded split of the ID test set (``id_val_fraction``; the rest is reported);
* layer-ensemble combiners (FSSD, Mahalanobis): during selection fitted on a seeded
  ``combiner_fraction`` of each validation set and scored on the rest; the selected
  configuration ships a combiner fitted on all of the validation data, as ``test`` does.

Command line: ``lightning-ood grid`` (:meth:`lightning_ood.trainer.OODTrainer.grid`, a
subcommand of the one LightningCLI, so ``--trainer.devices 2 --trainer.strategy ddp`` runs it
on two ranks)::

    lightning-ood grid --config configs/line_densenet_cifar10.yaml \\
        --grid configs/grid/line_densenet_cifar10.yaml [--cache_dir .cache/features] \\
        [--ckpt_path X] [--out DIR] [--data.init_args.train_every 10 ...]

Across ranks (:class:`Ranks`) every rank holds the features of its unpadded shard of each set
(``EvalShardedSampler``: rows ``r, r+w, ...``); detector fits reduce through the session's
reducer, scores are gathered in dataset order, and seeded splits of cached rows are drawn on
the gathered set and sharded again, so a grid on ``w`` ranks selects and reports what one
process does.

Fitting, scoring and metrics go through the session (:mod:`lightning_ood.engine`,
:mod:`lightning_ood.protocol`); the tables through :mod:`lightning_ood.report`. Which
hyperparameters can share one accumulation pass is each detector class's
``finalize_only``; which taps it reads, its ``tap_names``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from lightning_ood import engine, report, tuning
from lightning_ood.detectors import Reducer, build_detector
from lightning_ood.features import CachedFeatures, FeatureCache, compute_features, describe_loader
from lightning_ood.metrics import METRIC_NAMES
from lightning_ood.models.base import OODBackbone
from lightning_ood.protocol import CONVENTION, Protocol, average
from lightning_ood.report import HEADERS, LOWER_IS_BETTER
from lightning_ood.session import CachedSource, EvaluationSession, Gather, Sets
from lightning_ood.splits import fraction_size, seeded_parts
from lightning_ood.tuning import combinations  # noqa: F401  (re-exported: the grid API)

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
#: Spec keys that are fields of the shared :class:`~lightning_ood.protocol.Protocol` (they
#: replace the config's values for this grid).
SPEC_PROTOCOL_KEYS = ("select", "seed", "id_val_fraction", "combiner_fraction")
#: Why a grid without held-out ID validation data is refused.
NO_ID_VALIDATION = (
    "the grid needs held-out ID validation data that is never reported, as `tune` does: set "
    "`data.init_args.val_size` > 0 (held-out training images), or opt in to selecting on a "
    "seeded part of the ID test set with `id_val_fraction: 0.5` in the grid spec (that part "
    "is then not reported)"
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
        lines.append(
            f"| {' | '.join(cells)} | {report.pct(vm[sel])} | {report.pct(vm[second])} | {mark} |"
        )
    chosen = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    lines += [
        "",
        f"#### Test sets, selected configuration ({chosen}); "
        f"{meta.get('n_id_test')} ID test samples",
        "",
        *report.metrics_table({f"{result.kind} (selected)": result.test}),
    ]
    if result.reference is not None:
        ref = ", ".join(f"{k}={v}" for k, v in result.reference["params"].items())
        lines += [
            "",
            f"#### Reference configuration ({ref}), declared before the run, not selected",
            "",
            *report.metrics_table({f"{result.kind} (reference)": result.reference["test"]}),
        ]
    return "\n".join(lines) + "\n"


# -- ranks -----------------------------------------------------------------------------------
def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Ranks:
    """How the processes of one grid meet (default: one process).

    Every rank holds its shard of each cached set, rows ``rank, rank + world, ...`` of the
    set in dataset order (what ``EvalShardedSampler`` gives its loaders). The caller supplies
    the collectives (:mod:`lightning_ood.trainer` uses the trainer's strategy), so this module
    stays free of Lightning.

    Attributes:
        rank: this process's global rank.
        world: the number of processes.
        gather: this rank's per-sample rows -> every rank's, in dataset order.
        reducer: cross-rank sums and concatenations for detector fitting.
    """

    rank: int = 0
    world: int = 1
    gather: Gather = _same
    reducer: Reducer = field(default_factory=Reducer)

    def total(self, rows: int, device: torch.device | str = "cpu") -> int:
        """The number of rows of a set whose shard here has ``rows`` (summed over ranks, on
        ``device``: NCCL reduces CUDA tensors only)."""
        if self.world == 1:
            return rows
        return int(self.reducer.sum(torch.tensor([rows], dtype=torch.long, device=device)))

    def gathered(self, cached: CachedFeatures) -> CachedFeatures:
        """The whole set from every rank's shard, in dataset order."""
        if self.world == 1:
            return cached
        return CachedFeatures(
            self.gather(cached.features).cpu(),
            self.gather(cached.logits).cpu(),
            {k: self.gather(v).cpu() for k, v in cached.taps.items()},
            self.gather(cached.targets).cpu(),
            dict(cached.meta),
            cached.from_cache,
        )

    def shard(self, cached: CachedFeatures) -> CachedFeatures:
        """This rank's shard (rows ``rank, rank + world, ...``) of a whole set."""
        if self.world == 1:
            return cached
        return cached.subset(range(self.rank, len(cached), self.world))


# -- building blocks -------------------------------------------------------------------------
def _require_taps(cached: CachedFeatures, taps: Sequence[str], what: str) -> CachedFeatures:
    missing = [t for t in taps if t not in cached.taps]
    if missing:
        raise ValueError(
            f"the cached features of {what} lack taps {missing} (stored: {sorted(cached.taps)}); "
            "extract them with these taps"
        )
    return cached


def split_cached(
    cached: CachedFeatures, fraction: float, seed: int
) -> tuple[CachedFeatures, CachedFeatures]:
    """Seeded split: (first ``round(fraction·N)`` of a permutation, the rest)."""
    n = len(cached)
    head, rest = seeded_parts(n, [fraction_size(n, fraction)], seed, f"fraction={fraction} split")
    return cached.subset(head), cached.subset(rest)


# -- the grid --------------------------------------------------------------------------------
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
    select_metric: str | None = None,
    *,
    protocol: Protocol | None = None,
    seed: int | None = None,
    id_val_fraction: float | None = None,
    combiner_fraction: float | None = None,
    batch_size: int = 4096,
    reference: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
    groups: Mapping[str, str] | None = None,
    skipped_ood_sets: Mapping[str, str] | None = None,
    ranks: Ranks | None = None,
) -> GridResult:
    """Fit and score every combination from cache; select on validation; report on test:
    :meth:`lightning_ood.session.EvaluationSession.run` over cached sources, so the selected
    configuration gets exactly what ``lightning-ood test`` with ``tune`` gives it (shipped
    combiner fitted on all validation data, threshold, the shipped row on every test sample).

    Args:
        kind: detector registry name (``"line"``, ``"dice"``, ...).
        grid: hyperparameter -> list of values; every combination is tried.
        base: hyperparameters shared by all combinations (must not repeat a grid key).
        backbone: the network the features came from (its head is copied by ``finalize``).
        train: cached training-set outputs (eval transform), with the detector's taps; may
            be None for detectors that do not read the training set (MSP, Energy, FSSD).
        id_val: ID validation outputs (the datamodule's held-out training images), or None
            to split ``id_test`` when the protocol opts in (``id_val_fraction``).
        ood_val: validation OOD sets, name -> outputs; used for selection only.
        id_test: ID test outputs (the reported part, or the whole set to split).
        ood_test: reported OOD sets, name -> outputs; never used for selection.
        select_metric: alias of ``protocol.select`` (a key of ``METRIC_NAMES``).
        protocol: the shared :class:`~lightning_ood.protocol.Protocol` (default: its
            defaults, the same as ``lightning-ood test``'s); ``seed``, ``id_val_fraction`` and
            ``combiner_fraction`` given here replace its fields.
        batch_size: rows per detector call (memory only; results do not depend on it).
        reference: an optional configuration declared up front (e.g. the paper's values),
            fitted and scored on the same validation and test data for comparison; it takes
            no part in the selection.
        info: caller facts copied into ``meta`` (id_set, data_version, model, ...).
        progress: show progress bars.
        groups: ``{reported OOD set: group}``: ``average[group]`` rows beside ``average``.
        skipped_ood_sets: ``{OOD set: why}`` of declared sets left out (recorded in ``meta``).
        ranks: how the processes meet (:class:`Ranks`); under several ranks every cached set
            is this rank's shard, and the result is the one every rank gets.

    Raises:
        ValueError: bad grid/metric, validation OOD set also reported, detector needing
            input gradients, missing taps, no ID validation set without ``id_val_fraction``.
    """
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    base = dict(base or {})
    if select_metric is not None and select_metric not in METRIC_NAMES:
        raise ValueError(f"select_metric={select_metric!r} is not one of {list(METRIC_NAMES)}")
    given = {
        "select": select_metric,
        "seed": seed,
        "id_val_fraction": id_val_fraction,
        "combiner_fraction": combiner_fraction,
    }
    proto = (protocol or Protocol()).replace(**{k: v for k, v in given.items() if v is not None})
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
    search = tuning.plan(kind, kind, grid, base)  # validates every value first
    dets = search.candidates
    ref_det = None if reference is None else build_detector(kind, {**base, **reference})
    for det in [*dets, *([ref_det] if ref_det is not None else [])]:
        engine.check_feature_only(det)
    taps = engine.detector_taps(dets, backbone)
    if any(engine.reads_training_data(d) for d in dets):
        if train is None:
            raise ValueError(f"detector {kind!r} is fitted on the training set: pass `train`")
        _require_taps(train, taps, "the training set")
    if id_val is None:
        if proto.id_val_fraction is None:
            raise ValueError(NO_ID_VALIDATION)
        # drawn on the whole set (dataset order), then sharded again: the same split as one
        # process, whatever the number of ranks
        id_val, id_test = split_cached(ranks.gathered(id_test), proto.id_val_fraction, proto.seed)
        id_val, id_test = ranks.shard(id_val), ranks.shard(id_test)
        id_val_source = (
            f"seeded split of the ID test set: {proto.id_val_fraction:g} for selection, the "
            f"rest reported, seed {proto.seed}"
        )
    else:
        id_val_source = str((info or {}).get("id_val_source", "explicit ID validation set"))
    _require_taps(id_val, taps, "the ID validation set")
    _require_taps(id_test, taps, "the ID test set")
    for n, c in ood_val.items():
        _require_taps(c, taps, f"validation OOD set {n!r}")
    for n, c in ood_test.items():
        _require_taps(c, taps, f"test OOD set {n!r}")
    device = engine.module_device(backbone)
    needs_val = any(
        tuning.combines(d, backbone) for d in [*dets, *([ref_det] if ref_det is not None else [])]
    )

    def source(c: CachedFeatures) -> CachedSource:
        src = CachedSource(c, batch_size)
        src.gather = ranks.gather  # type: ignore[assignment]  (every rank's rows, in order)
        return src

    id_name = str((info or {}).get("id_set") or "ID")
    sets = Sets(
        train=None if train is None else source(train),
        id_val=source(id_val),
        val_ood={n: source(c) for n, c in ood_val.items()},
        test={id_name: source(id_test), **{n: source(c) for n, c in ood_test.items()}},
        id_val_note=id_val_source,
        groups=dict(groups or {}),
        skipped_ood_sets=dict(skipped_ood_sets or {}),
    )
    session = EvaluationSession(backbone, proto, reducer=ranks.reducer, progress=progress)
    # The shipped rows only: the papers' per-set rows are `lightning-ood test`'s reproduction.
    outcome = session.run({}, sets, searches=[search], per_set=False, info=info)
    assert outcome.tuned is not None
    rows, best_i = outcome.tuned.rows[kind]
    best_det = outcome.detectors[kind]
    test = outcome.evaluation.metrics[kind]

    ref_out: dict[str, Any] | None = None
    if ref_det is not None and reference is not None:  # declared up front, never selected
        ref_det.name = kind
        session.fit([ref_det], sets.train, id_val=sets.id_val)
        ref_val = session.validate([ref_det], sets)[kind]
        ref_run = session.run({kind: ref_det}, sets, per_set=False, info=info)
        ref_out = {
            "params": dict(reference),
            "val_mean": average(ref_val),
            "test": ref_run.evaluation.metrics[kind],
        }
    meta: dict[str, Any] = {
        **dict(info or {}),
        "convention": CONVENTION,
        "protocol": proto.record(),
        "val_ood_sets": list(ood_val),
        "test_ood_sets": list(ood_test),
        "groups": dict(groups or {}),
        "skipped_ood_sets": dict(skipped_ood_sets or {}),
        "ccr": outcome.results["ccr"],
        "n_train": 0 if train is None else ranks.total(len(train), device),
        "n_id_val": ranks.total(len(id_val), device),
        "n_id_test": ranks.total(len(id_test), device),
        "id_val_source": id_val_source,
        "seed": proto.seed,
        "combiner_fraction": proto.combiner_fraction if needs_val else None,
        "best_config": best_det.config(),
        "threshold": {"value": float(best_det.threshold), "id_tpr": proto.threshold_tpr},
        "shipped_combiner": outcome.shipped.get(kind),
        "fit_groups": outcome.tuned.fit_groups,
        "world_size": ranks.world,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return GridResult(
        kind=kind,
        base=base,
        grid={k: list(v) for k, v in grid.items()},
        select_metric=proto.select,
        rows=rows,
        best=best_i,
        test=test,
        reference=ref_out,
        meta=meta,
    )


# -- running a grid spec on a datamodule ----------------------------------------------------
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


def run_spec(
    spec: Mapping[str, Any],
    backbone: OODBackbone,
    dm: Any,
    *,
    spec_name: str = "<spec>",
    val_names_given: bool = False,
    cache: FeatureCache | None = None,
    progress: bool = True,
    info: Mapping[str, Any] | None = None,
    protocol: Protocol | None = None,
    ranks: Ranks | None = None,
) -> GridResult:
    """Run a grid spec (:func:`load_spec`) on an ``OODDataModule``: features of every set
    (through ``cache`` when given), then :func:`grid_search`.

    ``protocol`` is the run's shared :class:`~lightning_ood.protocol.Protocol` (``lightning-ood
    grid`` reads it from the config's OOD callback, so ``test`` and ``grid`` select alike);
    the spec's ``select``, ``seed``, ``combiner_fraction`` and ``id_val_fraction`` keys, when
    present, replace its fields. ID validation data is the datamodule's held-out training
    split (``val_size`` > 0); with ``val_size`` 0 the grid is refused, as ``tune`` is, unless
    the spec opts in to selecting on a seeded part of the ID test set (``id_val_fraction``).

    The validation OOD sets come from the spec (``val_ood_sets``) unless the datamodule was
    configured with its own (``val_names_given``); either way they may not read a reported
    sample. With ``info["ckpt_path"]`` (the checkpoint the backbone's weights came from), the
    Outlier Exposure sets and training split it records are checked as ``test`` checks them,
    before any feature is computed.

    Under several ``ranks`` the datamodule's loaders must give each rank its unpadded shard
    (an ``OODDataModule`` attached to the trainer does). The feature cache then keeps one entry
    per rank, keyed by ``(rank, world size)`` besides the usual identities: a shard's rows
    depend on both, and an entry of another world size is never mistaken for this shard
    (a run on another number of ranks computes its own entries; one process's entries are
    the whole sets, keyed as before). Entries are never gathered into whole-set ones: that
    would hold every rank's features in one process, which sharding exists to avoid.
    """
    from lightning_ood.data import parse_ood_spec, train_eval_loader
    from lightning_ood.task import recorded_training

    proto = (protocol or Protocol()).replace(
        where=f"grid spec {spec_name!r}: ",
        **{k: spec[k] for k in SPEC_PROTOCOL_KEYS if k in spec and spec[k] is not None},
    )
    spec_val = spec.get("val_ood_sets")
    if spec_val is not None and not val_names_given:  # the grid spec names the validation sets
        dm.val_ood_specs = [parse_ood_spec(e) for e in spec_val]
    val_names = list(dm.val_ood_names)
    if spec_val is not None:
        wanted = [e if isinstance(e, str) else e.get("name") for e in spec_val]
        missing = [n for n in wanted if n not in val_names]
        if missing:
            raise ValueError(
                f"grid spec {spec_name!r} names validation OOD sets {missing}, but "
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
    if hasattr(dm, "check_sample_leaks"):
        dm.check_sample_leaks()  # the spec's val_ood_sets, by what they read
    ckpt = (info or {}).get("ckpt_path")
    record = recorded_training(ckpt) if ckpt else None
    if record is not None and hasattr(dm, "check_outliers"):
        trained = [r.get("name") for r in record.outliers]
        dm.check_outliers(
            record.outliers, f"checkpoint {ckpt} (trained with Outlier Exposure on {trained})"
        )
    val_size = int(getattr(dm, "val_size", 0) or 0)
    if val_size <= 0 and proto.id_val_fraction is None:  # before any data is read
        raise ValueError(NO_ID_VALIDATION)
    dm.prepare_data()
    dm.setup("test")
    if record is not None and hasattr(dm, "check_split"):
        for note in dm.check_split(record.splits, record.unrecorded, f"checkpoint {ckpt}"):
            warnings.warn(f"[lightning_ood] {note}", stacklevel=2)
    all_val = dm.val_ood_dataloaders()
    val_loaders = {n: all_val[n] for n in val_names}
    test_loaders = dm.test_dataloader()
    test_loaders = test_loaders if isinstance(test_loaders, list | tuple) else [test_loaders]

    kind = spec["detector"]
    base = dict(spec.get("base") or {})
    probe = [build_detector(kind, {**base, **c}) for c in tuning.combinations(spec["grid"])]
    taps = engine.detector_taps(probe, backbone)

    ranks = ranks or Ranks()

    def features(loader: Any, what: str) -> CachedFeatures:
        if cache is None:
            return compute_features(backbone, loader, taps, progress=progress, desc=what)
        dataset_id = transform_id = None
        if ranks.world > 1:  # this rank's shard: its own entry (see above)
            whole, transform_id = describe_loader(loader)
            shard = {"rank": ranks.rank, "world_size": ranks.world}
            dataset_id = json.dumps({"dataset": json.loads(whole), "shard": shard}, sort_keys=True)
        got = cache.get_or_compute(
            backbone, loader, taps, dataset_id, transform_id, progress=progress, desc=what
        )
        assert isinstance(got, CachedFeatures)  # no shard_rows: whole entries only
        return got

    t0 = time.perf_counter()
    train = None
    if any(engine.reads_training_data(d) for d in probe):
        train = features(train_eval_loader(dm), "train")
    id_test = features(test_loaders[0], names[0])
    id_val, id_val_source = None, None
    if val_size > 0:  # the datamodule holds out training samples: select on those
        id_val = features(dm.val_dataloader(), f"val:{names[0]}")
        id_val_source = f"{val_size} training samples held out by the datamodule (val_size)"
    ood_test = {n: features(ld, n) for n, ld in zip(names[1:], test_loaders[1:], strict=True)}
    ood_val = {n: features(ld, f"val:{n}") for n, ld in val_loaders.items()}
    facts = {
        "id_set": getattr(dm, "id_name", names[0]),
        "data_version": getattr(dm, "data_version", names[0]),
        **dict(info or {}),
        "feature_seconds": round(time.perf_counter() - t0, 3),
        **({"id_val_source": id_val_source} if id_val_source else {}),
        "cache": None
        if cache is None
        else {"dir": str(cache.root), "hits": cache.hits, "misses": cache.misses},
    }
    return grid_search(
        kind,
        spec["grid"],
        base,
        backbone,
        train,
        id_val,
        ood_val,
        id_test,
        ood_test,
        protocol=proto,
        batch_size=int(spec.get("batch_size", 4096)),
        reference=spec.get("reference"),
        info=facts,
        progress=progress,
        groups=dm.groups() if hasattr(dm, "groups") else None,
        skipped_ood_sets=dm.skipped_ood_sets() if hasattr(dm, "skipped_ood_sets") else None,
        ranks=ranks,
    )


def write_grid_results(result: GridResult, out: str | os.PathLike[str]) -> list[Path]:
    """``grid_results.{md,json,csv}`` (the CSV holds the selected and reference test rows)."""
    rows = {f"{result.kind} (selected)": result.test}
    if result.reference is not None:
        rows[f"{result.kind} (reference)"] = result.reference["test"]
    return report.write_results(out, "grid_results", result.to_dict(), result.to_markdown(), rows)
