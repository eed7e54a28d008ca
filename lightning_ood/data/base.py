"""The OOD-aware datamodule contract every ID set implements (:class:`OODDataModule`).

:class:`OODDataModule` is the contract the task and the OOD callback rely on: an ID set
(train / val / test, plus the training set under the eval transform for detector fitting),
named OOD test sets that are reported, and OOD validation sets that only tune
hyperparameters. ``__init__`` only stores and validates arguments; files are read in
:meth:`~OODDataModule.setup` and downloaded (only when allowed) in
:meth:`~OODDataModule.prepare_data`. The ID sets live one family per module:
:mod:`~lightning_ood.data.mnist`, :mod:`~lightning_ood.data.cifar`,
:mod:`~lightning_ood.data.genome`, :mod:`~lightning_ood.data.imagenet`.

Validation of the classifier: with ``val_size: 0`` (default) the ID test set doubles as the
validation set, as in the DICE/LINe/FSSD training scripts; ``val_size: n`` holds out ``n``
seeded training samples instead (they are then excluded from training and detector fitting).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from lightning_ood.checks import check_at_least
from lightning_ood.data.corruptions import CorruptionSpec, parse_corruption_spec
from lightning_ood.data.ood_sets import (
    OOD_SETS,
    OODSpec,
    build_ood_dataset,
    download_ood_set,
    id_test_view,
    missing_reason,
    ood_location,
    parse_ood_spec,
    parse_ood_specs,
)
from lightning_ood.data.paths import guarded_download, resolve_root
from lightning_ood.data.readers import CorruptDataError, Transformed, take_every
from lightning_ood.data.samplers import (
    EvalShardedSampler,
    ResumableDataLoader,
    ShardedSampler,
    rank_and_world,
)
from lightning_ood.data.transforms import Normalization, eval_transform
from lightning_ood.splits import seeded_parts

OODEntry = str | dict[str, Any]


#: A place samples are read from: ``(scope, where, reader)`` (see :class:`SampleIdentity`).
Place = tuple[str, str, str]


@dataclass(frozen=True)
class SampleIdentity:
    """Which samples an OOD set reads, whatever its entry is called: two names for one set of
    files are one identity, so no check may compare names.

    Attributes:
        places: where the samples come from, as ``(scope, where, reader)``: scope ``"path"``
            with the real path of the set's location (symlinks and ``..`` resolved), and for a
            set read from its registered default location also scope ``"default"`` with that
            location relative to the data root (the same files under any root, e.g. in a
            checkpoint written on another machine). ``reader`` is the registry kind for kinds
            that read a fixed part of a root folder (CIFAR under the data root), else ``""``.
        every: the slice step (every n-th sample in file order).
        offset: the slice's first sample.
        half: ``(split_seed, part)`` of a ``corrupted`` set (its seeded half of the base),
            else None. A corruption does not change which samples are read: a corrupted copy
            of a set is the same samples.
    """

    places: frozenset[Place]
    every: int = 1
    offset: int = 0
    half: tuple[int, int] | None = None

    @property
    def location(self) -> str:
        """The real path the samples are read from (for messages)."""
        return next((where for scope, where, _ in sorted(self.places) if scope == "path"), "?")

    def shares_samples(self, other: SampleIdentity) -> bool:
        """Whether the two read at least one common sample: a common place (a folder holds
        every file below it: image folders are read recursively) and slices that meet."""
        if not any(_same_files(p, q) for p in self.places for q in other.places):
            return False
        if self.half is not None or other.half is not None:
            # Seeded halves: only the two halves of one split are known to be disjoint.
            a, b = self.half, other.half
            return not (a is not None and b is not None and a[0] == b[0] and a[1] != b[1])
        # offset + k * every meet iff the offsets agree modulo the gcd of the steps
        return (self.offset - other.offset) % math.gcd(self.every, other.every) == 0

    def to_record(self) -> dict[str, Any]:
        """Plain data (lists, strings, numbers) for a checkpoint."""
        return {
            "places": [list(p) for p in sorted(self.places)],
            "every": self.every,
            "offset": self.offset,
            "half": None if self.half is None else list(self.half),
        }

    @classmethod
    def from_record(cls, record: Any) -> SampleIdentity | None:
        """The identity :meth:`to_record` wrote; None for anything else (an older record)."""
        try:
            places = frozenset((str(s), str(w), str(r)) for s, w, r in record["places"])
            half = record.get("half")
            return cls(
                places,
                int(record["every"]),
                int(record.get("offset", 0)),
                None if half is None else (int(half[0]), int(half[1])),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def _same_files(p: Place, q: Place) -> bool:
    (scope, where, reader), (scope2, where2, reader2) = p, q
    if scope != scope2:
        return False
    if scope == "default":
        return where == where2 and reader == reader2
    if where == where2:
        return reader == reader2 or not reader or not reader2
    inner, outer = PurePath(where), PurePath(where2)
    return (not reader2 and inner.is_relative_to(outer)) or (
        not reader and outer.is_relative_to(inner)
    )


def sample_identity(
    spec: OODSpec, root: Path, split: Literal["test", "val"] = "test", every: int = 1
) -> SampleIdentity:
    """What ``spec`` reads under the data ``root`` as the ``split`` variant, with the
    datamodule's default slice step ``every`` (the entry's own wins); reads no file.

    A ``corrupted`` set is its base set's samples (its seeded half of them); a registered kind
    given another ``path`` is the files at that path, whatever it is named.
    """
    kind, half = spec.kind, None
    if kind == "corrupted":
        kind = str(spec.options["base"])
        half = (int(spec.options.get("split_seed", 0)), 1)  # corruption_halves()[1]
        info = OOD_SETS[kind]
        sub = info.subpath or ""
        location = (spec.path if spec.path is not None else root) / sub
    else:
        info = OOD_SETS[kind]
        location = ood_location(spec, root, split)
        sub = (info.val_subpath if split == "val" and info.val_subpath else info.subpath) or ""
    reader = kind if info.subpath == "" else ""
    places = {("path", os.path.realpath(location), reader)}
    if spec.path is None:
        places.add(("default", sub, reader))
    return SampleIdentity(frozenset(places), spec.every or every, 0, half)


def outlier_record(spec: OODSpec, root: Path) -> dict[str, Any]:
    """What a checkpoint records of an Outlier Exposure set (plain data): the entry, and which
    samples it is (:meth:`SampleIdentity.to_record`), so that no later run reports or tunes
    on them under another name or path."""
    path = None if spec.path is None else str(spec.path)
    identity = sample_identity(spec, root)
    return {"name": spec.name, "kind": spec.kind, "path": path, "samples": identity.to_record()}


def recorded_identity(record: Mapping[str, Any], root: Path) -> SampleIdentity | None:
    """The samples an :func:`outlier_record` names; for a record written before identities
    were stored (name, kind and path only) those of that entry under ``root``; None when
    neither can be known (then only its name can be compared)."""
    identity = SampleIdentity.from_record(record.get("samples"))
    if identity is not None:
        return identity
    entry = {"name": record.get("name"), "kind": record.get("kind")}
    if record.get("path"):
        entry["path"] = record["path"]
    try:
        return sample_identity(parse_ood_spec(entry), root)
    except (KeyError, TypeError, ValueError):
        return None


#: ``(label naming the entry, entry name, its samples)``, as :meth:`OODDataModule.leak_entries`.
Entry = tuple[str, str, SampleIdentity]


def check_outlier_leak(
    outliers: Sequence[Mapping[str, Any]], entries: Sequence[Entry], where: str, root: Path
) -> None:
    """Refuse any reported or tuning entry that reads a sample a model saw as Outlier
    Exposure outliers in training (compared by :class:`SampleIdentity`, not by name): its
    scores would be leaked."""
    for rec in outliers:
        identity = recorded_identity(rec, root)
        for label, name, other in entries:
            same = other.shares_samples(identity) if identity else name == rec.get("name")
            if same:
                where_oe = f" at {identity.location}" if identity else ""
                raise ValueError(
                    f"{where}: {label} reads samples of {rec.get('name')!r} (kind "
                    f"{rec.get('kind')!r}{where_oe}), the Outlier Exposure set the model is "
                    "trained with (a corrupted copy or another name or path is still the same "
                    "samples); a set seen in training must never be a reported OOD set nor a "
                    f"tuning set: drop {name!r} from {label.split()[0]}, or train with "
                    "another outlier_set"
                )


def has_train_eval_loader(datamodule: Any) -> bool:
    """Whether :func:`train_eval_loader` can read ``datamodule``'s training set."""
    return any(
        callable(getattr(datamodule, n, None)) for n in ("train_eval_dataloader", "fit_dataloader")
    )


def train_eval_loader(datamodule: Any) -> Any:
    """``datamodule``'s training set under the eval transform (the detector-fitting pass):
    ``train_eval_dataloader()``, or ``fit_dataloader()`` of a datamodule written before that
    name (with a DeprecationWarning); None when it has neither."""
    # an override of the old name only (a subclass written before the rename) wins over the
    # base class's train_eval_dataloader, which it never knew of
    cls = type(datamodule)
    new_is_base = getattr(cls, "train_eval_dataloader", None) is OODDataModule.train_eval_dataloader
    old_own = getattr(cls, "fit_dataloader", OODDataModule.fit_dataloader)
    old_only = new_is_base and old_own is not OODDataModule.fit_dataloader
    if callable(getattr(datamodule, "train_eval_dataloader", None)) and not old_only:
        return datamodule.train_eval_dataloader()
    if callable(getattr(datamodule, "fit_dataloader", None)):
        warnings.warn(
            f"{type(datamodule).__name__}.fit_dataloader() is deprecated; name it "
            "train_eval_dataloader() (the training set under the eval transform)",
            DeprecationWarning,
            stacklevel=2,
        )
        return datamodule.fit_dataloader()
    return None


def trained_indices(train_size: int, val_size: int, val_seed: int, train_every: int) -> set[int]:
    """The training images a run with this split trained on (:meth:`OODDataModule._split`,
    then every ``train_every``-th)."""
    if val_size == 0:
        rest: Sequence[int] = range(train_size)
    else:
        rest = sorted(seeded_parts(train_size, [val_size], val_seed)[1].tolist())
    return set(rest[::train_every])


class OODDataModule(LightningDataModule):
    """Base datamodule: an ID set plus named OOD sets, with one shared eval pipeline.

    Args:
        root: data root; ``None`` uses :func:`~lightning_ood.data.default_data_root`
            (``$LIGHTNING_OOD_DATA``, ``../shared/data``, else ``./data``).
        batch_size: training batch size.
        eval_batch_size: batch size of every other loader (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        ood_sets: reported OOD test sets: registry names or dicts
            ``{name, kind?, path?, every?, group?, missing?, ...}`` (see
            :mod:`lightning_ood.data.ood_sets`). ``group`` (near, far, ...) is reported by
            :meth:`groups`; ``missing: skip`` leaves out a set whose files are not there, with
            a warning, recorded by :meth:`skipped_ood_sets`.
        val_ood_sets: OOD sets used only for hyperparameter selection, never reported.
        train_every: keep every n-th training sample (file order), for fast runs.
        test_every: keep every n-th ID test/validation sample.
        ood_every: keep every n-th sample of each OOD set (an entry's ``every`` wins).
        val_size: training samples held out (seeded) for validation; 0 = validate on the ID
            test set, as the reference training scripts do.
        val_seed: seed of the held-out split.
        download: allow torchvision downloads; ``None`` = only when ``root`` fell back to
            ``./data``.
        pin_memory: DataLoader ``pin_memory``.
        shuffle_seed: seed of the per-epoch training permutation; ``None`` = the
            ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
        predict_sets: sets ``lightning-ood predict`` scores after the ID test set (registry
            names or ``{name, kind: folder, path}`` for your own images); default none.
            Each is scored whole: ``ood_every`` does not apply, an entry's own ``every`` does.
        outlier_set: Outlier Exposure (Hendrycks et al. 2019): an auxiliary OOD set (an
            ``ood_sets`` entry, e.g. ``kmnist``) that :meth:`train_dataloader` pairs with the
            ID batches in a ``CombinedLoader({"id", "outliers"})``; it may not be reported.
        outlier_batch_size: outliers per training step (default: ``batch_size``).
        test_corruption: ``{corruption, severity, seed?}`` applied to the ID test set and to
            every reported OOD set, never to training, fitting or validation data (FSSD paper
            Figure 5; :mod:`~lightning_ood.data.corruptions`); recorded in ``data_version``.
    """

    #: Name of the ID set, first entry of ``test_set_names``.
    id_name: ClassVar[str] = "id"
    #: Human name used in messages ("FashionMNIST", "CIFAR-10").
    display_name: ClassVar[str] = "the ID set"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        ood_sets: list[OODEntry] | None = None,
        val_ood_sets: list[OODEntry] | None = None,
        train_every: int = 1,
        test_every: int = 1,
        ood_every: int = 1,
        val_size: int = 0,
        val_seed: int = 0,
        download: bool | None = None,
        pin_memory: bool = False,
        shuffle_seed: int | None = None,
        predict_sets: list[OODEntry] | None = None,
        test_corruption: dict[str, Any] | None = None,
        outlier_set: OODEntry | None = None,
        outlier_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_at_least(
            1,
            batch_size=batch_size,
            train_every=train_every,
            test_every=test_every,
            ood_every=ood_every,
        )
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        if num_workers < 0 or val_size < 0:
            raise ValueError(
                f"num_workers and val_size must be >= 0, got {num_workers} and {val_size}"
            )
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.train_every = train_every
        self.test_every = test_every
        self.ood_every = ood_every
        self.val_size = val_size
        self.val_seed = val_seed
        self.download = download
        self.pin_memory = pin_memory
        self.shuffle_seed = shuffle_seed
        self.predict_specs: list[OODSpec] = [parse_ood_spec(s) for s in predict_sets or []]
        # Parsing validates names and keys; it reads nothing from disk.
        self.ood_specs: list[OODSpec] = parse_ood_specs(ood_sets)
        self.val_ood_specs: list[OODSpec] = parse_ood_specs(val_ood_sets)
        self.test_corruption: CorruptionSpec | None = parse_corruption_spec(test_corruption)
        #: Every ``ood_sets`` entry as configured; ``ood_specs`` drops the skipped missing ones.
        self.declared_ood_specs: list[OODSpec] = list(self.ood_specs)
        self._skipped: dict[str, str] | None = None
        self._check_names()
        self.outlier_spec = None if outlier_set is None else parse_ood_spec(outlier_set)
        self._check_reported_only(
            [("predict_sets", self.predict_specs), ("val_ood_sets", self.val_ood_specs)]
            + ([("outlier_set", [self.outlier_spec])] if self.outlier_spec else [])
        )
        if outlier_batch_size is not None and outlier_batch_size < 1:
            raise ValueError(f"outlier_batch_size must be >= 1, got {outlier_batch_size}")
        self.outlier_batch_size = outlier_batch_size or batch_size
        if self.outlier_spec is not None and self.id_name in (
            self.outlier_spec.name,
            self.outlier_spec.kind,
        ):
            raise ValueError(
                f"outlier_set {self.outlier_spec.name!r} is the in-distribution set of "
                f"{type(self).__name__}; Outlier Exposure needs an auxiliary OOD set"
            )
        self.check_sample_leaks()
        self._outliers: Dataset | None = None
        self._resolved: tuple[Path, bool] | None = None
        self._sets: dict[str, Dataset] | None = None
        self._ood: list[Dataset] = []
        self._val_ood: dict[str, Dataset] = {}
        self._data_version: str | None = None
        self._class_names: list[str] | None = None
        self._train_size: int | None = None
        self._held_out: list[int] = []

    # -- what subclasses provide ------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of ID classes."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Model input: (C, H, W) for images, (seq_len,) for token sequences."""
        raise NotImplementedError

    @property
    def normalization(self) -> Normalization | None:
        """The ID (mean, std) every image set is normalised with; None for token data."""
        return None

    @property
    def class_names(self) -> list[str]:
        """ID class names in label order (from the data files once set up, else indices)."""
        if self._class_names:
            return list(self._class_names)
        return [str(i) for i in range(self.num_classes)]

    def hand_off_meta(self) -> dict[str, Any]:
        """What a checkpoint must carry for a team that has only the checkpoint."""
        norm = self.normalization
        return {
            "id_set": self.id_name,
            "data_version": self.data_version,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "input_shape": list(self.input_shape),
            "mean": None if norm is None else [float(v) for v in norm[0]],
            "std": None if norm is None else [float(v) for v in norm[1]],
            "input_range": "float in [0, 1] (or uint8 0..255), before normalisation",
        }

    def _id_present(self, root: Path) -> bool:
        raise NotImplementedError

    def _download_id(self, root: Path) -> None:
        """Fetch the ID data into ``root`` (called inside :func:`guarded_download`)."""

    def _load_id(self, root: Path) -> dict[str, Dataset]:
        """Raw ``(image, label)`` readers: keys "train", "test" and optionally "val"."""
        raise NotImplementedError

    def _train_transform(self) -> Any:
        return self._eval_transform()

    def _eval_transform(self) -> Any:
        norm = self.normalization
        if norm is None:
            return None
        return eval_transform(self.input_shape, *norm)

    # -- names --------------------------------------------------------------------------------
    def _check_names(self) -> None:
        for label, specs in (("ood_sets", self.ood_specs), ("val_ood_sets", self.val_ood_specs)):
            names = [s.name for s in specs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{label} names must be unique; repeated: {dupes}")
            if self.id_name in names:
                raise ValueError(
                    f"{label} contains {self.id_name!r}, the in-distribution set of "
                    f"{type(self).__name__}; name an OOD set that differs from the ID data"
                )
        self._check_groups()

    @staticmethod
    def _check_reported_only(labelled: Sequence[tuple[str, Sequence[OODSpec]]]) -> None:
        """``group`` and ``missing`` describe reported sets; anywhere else they would be
        silently meaningless (a tuning set is never averaged, nor may it vanish)."""
        for label, specs in labelled:
            for spec in specs:
                keys = ["group"] if spec.group is not None else []
                keys += ["missing"] if spec.missing != "error" else []
                if keys:
                    raise ValueError(
                        f"{label} entry {spec.name!r} sets {keys}, which apply to reported "
                        "ood_sets only; drop them from this entry"
                    )

    def _check_groups(self) -> None:
        """A group's row sits beside the set rows: its name may not be a set's or the ID's."""
        names = {self.id_name, *(s.name for s in self.ood_specs)}
        for spec in self.ood_specs:
            if spec.group is not None and spec.group in names:
                raise ValueError(
                    f"ood_sets entry {spec.name!r} has group {spec.group!r}, the name of a "
                    "set; a group's row would be mistaken for that set's: rename the group"
                )

    def _leak_root(self) -> Path:
        """The data root the entries resolve against (not cached: nothing is read yet)."""
        return resolve_root(self.root, self.download)[0]

    def _entries(self, label: str, split: Literal["test", "val"]) -> list[Entry]:
        specs = self.ood_specs if split == "test" else self.val_ood_specs
        root = self._leak_root()
        out: list[Entry] = []
        for spec in specs:
            ident = sample_identity(spec, root, split, self.ood_every)
            out.append(
                (f"{label} entry {spec.name!r} ({spec.kind}, {ident.location})", spec.name, ident)
            )
        return out

    def leak_entries(self) -> list[Entry]:
        """Every reported (``ood_sets``) and tuning (``val_ood_sets``) entry with the samples
        it reads (:func:`sample_identity`), for the leak checks."""
        return [*self._entries("ood_sets", "test"), *self._entries("val_ood_sets", "val")]

    def check_sample_leaks(self) -> None:
        """Refuse a tuning set, or the Outlier Exposure set, that reads any sample of a
        reported set; compared by what is read (kind, location, split, slice), never by
        name. Reads no file."""
        reported = self._entries("ood_sets", "test")
        tuning = self._entries("val_ood_sets", "val")
        for v_label, v_name, v_ident in tuning:
            for r_label, _, r_ident in reported:
                if v_ident.shares_samples(r_ident):
                    raise ValueError(
                        f"{v_label} and {r_label} read the same samples, which would be both "
                        "reported (ood_sets) and used for tuning (val_ood_sets): tuning would "
                        "select on reported samples while the results say they were never "
                        "reported. Validate on another set (e.g. val_ood_sets: [kmnist]) or "
                        f"on other files ({{name: {v_name}, kind: folder, path: <a folder "
                        "no reported set reads>})"
                    )
        record = self.outlier_record()
        if record is not None:
            check_outlier_leak([record], [*reported, *tuning], "outlier_set", self._leak_root())

    def outlier_record(self) -> dict[str, Any] | None:
        """The checkpoint record of this datamodule's ``outlier_set`` (None without one)."""
        if self.outlier_spec is None:
            return None
        return outlier_record(self.outlier_spec, self._leak_root())

    def check_outliers(self, outliers: Sequence[Mapping[str, Any]], where: str) -> None:
        """Refuse reporting or tuning on samples a model saw as Outlier Exposure outliers
        (``outliers``: :func:`outlier_record` dicts, e.g. from a checkpoint)."""
        if outliers:
            check_outlier_leak(outliers, self.leak_entries(), where, self._leak_root())

    @property
    def test_set_names(self) -> list[str]:
        """``[id_name, *OOD names]``, in the order of :meth:`test_dataloader` (without the
        ``missing: skip`` sets that are not there: :meth:`skipped_ood_sets`)."""
        self._skip_missing()
        return [self.id_name, *(s.name for s in self.ood_specs)]

    def groups(self) -> dict[str, str]:
        """``{OOD set: group}`` of the reported sets that have a group (``group:`` in
        ``ood_sets``), in ``test_set_names`` order, for
        :func:`lightning_ood.metrics.group_averages`. Skipped missing sets are not in it."""
        self._skip_missing()
        return {s.name: s.group for s in self.ood_specs if s.group is not None}

    def skipped_ood_sets(self) -> dict[str, str]:
        """``{OOD set: why}`` of the ``missing: skip`` sets left out because their files are
        not under the data root (empty when none is), for the results to name."""
        self._skip_missing()
        return dict(self._skipped or {})

    def _skip_missing(self) -> None:
        """Resolve ``missing: skip`` once (existence checks only, no file is read): drop the
        sets that are not there from ``ood_specs``, warning for each. A run whose every
        reported set is missing stops. No-op without ``missing: skip`` entries."""
        if self._skipped is not None:
            return
        if not any(s.missing == "skip" for s in self.declared_ood_specs):
            self._skipped = {}
            return
        root, _ = self.resolved_root()
        skipped: dict[str, str] = {}
        for spec in self.declared_ood_specs:
            if spec.missing == "skip":
                reason = missing_reason(spec, root)
                if reason is not None:
                    skipped[spec.name] = reason
        kept = [s for s in self.declared_ood_specs if s.name not in skipped]
        if skipped and not kept:
            raise FileNotFoundError(
                f"none of the ood_sets is under the data root {root}, nothing would be "
                "reported: "
                + "; ".join(f"{n}: {r}" for n, r in skipped.items())
                + ". Put at least one there or pass --data.root"
            )
        for name, reason in skipped.items():
            warnings.warn(self._skip_message(name, reason, kept), stacklevel=3)
        self.ood_specs = kept
        self._skipped = skipped

    def _skip_message(self, name: str, reason: str, kept: Sequence[OODSpec]) -> str:
        spec = next(s for s in self.declared_ood_specs if s.name == name)
        text = f"OOD set {name!r} SKIPPED (missing: skip): {reason}."
        if spec.group is not None:
            declared = [s.name for s in self.declared_ood_specs if s.group == spec.group]
            present = [s.name for s in kept if s.group == spec.group]
            text += (
                f" Group {spec.group!r} averages {len(present)} of its {len(declared)} sets "
                f"({', '.join(present) or 'none'}), so its row is not the full benchmark's."
            )
        return text + " Put the files there (or give the entry a path) to report it."

    @property
    def val_ood_names(self) -> list[str]:
        """Names of the tuning-only OOD sets, the keys of :meth:`val_ood_dataloaders`."""
        return [s.name for s in self.val_ood_specs]

    @property
    def data_version(self) -> str:
        """Which copy of the ID data was read (results must name it); known after setup."""
        return self._data_version or self.id_name

    # -- data root / lifecycle ------------------------------------------------------------------
    def resolved_root(self) -> tuple[Path, bool]:
        """``(data root, download allowed)`` after applying the defaults."""
        if self._resolved is None:
            self._resolved = resolve_root(self.root, self.download)
        return self._resolved

    def prepare_data(self) -> None:
        """Download missing ID/OOD data where allowed (``download``) and possible."""
        root, download = self.resolved_root()
        if not download:
            return
        if not self._id_present(root):
            guarded_download(self.display_name, root, lambda: self._download_id(root))
        for spec in [*self.declared_ood_specs, *self.val_ood_specs]:
            try:
                download_ood_set(spec, root)
            except RuntimeError as err:
                if spec.missing != "skip":
                    raise
                warnings.warn(f"{err} (missing: skip: it will be left out)", stacklevel=2)
        if self._sets is None:  # what is missing is decided after the downloads
            self.ood_specs, self._skipped = list(self.declared_ood_specs), None

    def setup(self, stage: str | None = None) -> None:
        """Open every set (ID train/val/test, OOD test, OOD val) for any stage.

        All stages build everything: the detector-fitting pass needs the training set at
        test time, and a wrong OOD path should fail before training rather than after it.
        """
        if self._sets is not None:
            return
        root, _ = self.resolved_root()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data root {root} does not exist ({self.display_name} is read from there); "
                "pass --data.root, set LIGHTNING_OOD_DATA, or set download: true"
            )
        self._skip_missing()
        try:
            raw = self._load_id(root)
        except FileNotFoundError:
            raise
        except CorruptDataError as err:  # names the file and the fix already
            raise CorruptDataError(
                f"reading {self.display_name} under {root} failed: {err}", err.path
            ) from err
        except (RuntimeError, OSError, EOFError) as err:  # ValueErrors already say what to fix
            raise CorruptDataError(
                f"reading {self.display_name} under {root} failed ({type(err).__name__}: {err}); "
                "its files are probably truncated or corrupt: copy them again (or delete them "
                "and set download: true)"
            ) from err
        classes = getattr(raw["train"], "classes", None)
        if isinstance(classes, list | tuple) and len(classes) == self.num_classes:
            self._class_names = [str(c) for c in classes]
        train_idx, val_idx = self._split(len(raw["train"]))  # type: ignore[arg-type]
        self._train_size = len(raw["train"])  # type: ignore[arg-type]
        self._held_out = val_idx[:: self.test_every]
        train_idx = train_idx[:: self.train_every]
        eval_tf = self._eval_transform()
        if self.test_corruption is not None:
            self._data_version = (
                f"{self.data_version}; test sets corrupted: {self.test_corruption.describe()}"
            )
        id_test = raw["test"]
        if self.test_corruption is not None or any(s.kind == "corrupted" for s in self.ood_specs):
            id_test = id_test_view(
                id_test, self.id_name, self.ood_specs, self.input_shape, self.test_corruption
            )
        sets: dict[str, Dataset] = {
            "train": Transformed(Subset(raw["train"], train_idx), self._train_transform()),
            "fit": Transformed(Subset(raw["train"], train_idx), eval_tf),
            "test": Transformed(take_every(id_test, self.test_every), eval_tf),
        }
        if val_idx:
            sets["val"] = Transformed(Subset(raw["train"], val_idx[:: self.test_every]), eval_tf)
        else:
            val_raw = raw.get("val", raw["test"])
            sets["val"] = Transformed(take_every(val_raw, self.test_every), eval_tf)
        for split, ds in sets.items():
            if len(ds) == 0:  # type: ignore[arg-type]
                raise ValueError(
                    f"{self.display_name} {split} set under {root} is empty (train_every="
                    f"{self.train_every}, test_every={self.test_every}, val_size={self.val_size})"
                )
        self._ood = [self._build_ood(s, root, "test") for s in self.ood_specs]
        self._val_ood = {s.name: self._build_ood(s, root, "val") for s in self.val_ood_specs}
        self._sets = sets

    def _build_ood(self, spec: OODSpec, root: Path, split: Literal["test", "val"]) -> Dataset:
        corruption = self.test_corruption if split == "test" else None
        return build_ood_dataset(
            spec,
            root,
            self.input_shape,
            self.normalization,
            every=self.ood_every,
            split=split,
            corruption=corruption,
        )

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        """``(training, held-out validation)`` indices of the ``n`` training samples, sorted.

        The hold-out is the first ``val_size`` entries of the project's one seeded permutation
        (:func:`~lightning_ood.splits.seeded_parts`, seed ``val_seed``).
        """
        if self.val_size == 0:
            return list(range(n)), []
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} leaves no training samples out of {n}")
        held, rest = seeded_parts(
            n, [self.val_size], self.val_seed, what=f"{self.display_name} training set"
        )
        return sorted(rest.tolist()), sorted(held.tolist())

    # -- the training split a checkpoint records ----------------------------------------------
    def split_record(self) -> dict[str, Any]:
        """Which training images this run trains on (plain data, for the checkpoint): of the
        ``train_size`` images of ``id_set``, the first ``val_size`` of the seeded permutation
        ``val_seed`` are held out, every ``train_every``-th of the rest is trained on."""
        self._ready()
        return {
            "id_set": self.id_name,
            "train_size": self._train_size,
            "val_size": self.val_size,
            "val_seed": self.val_seed,
            "train_every": self.train_every,
        }

    def check_split(
        self, records: Sequence[Mapping[str, Any]], unrecorded: Sequence[str], where: str
    ) -> list[str]:
        """Refuse a hold-out (the ID validation data: thresholds, tuning, validation) holding
        training images a network was trained on.

        Args:
            records: :meth:`split_record` dicts of the runs that trained the weights.
            unrecorded: the weights' sources that recorded no split (older checkpoints).
            where: the weights, for messages.

        Returns:
            Warnings: a source whose split is unknown, or a record of another copy of the data
            (another training-set size), cannot be checked.

        Raises:
            ValueError: a held-out image was trained on; names both splits and the fix.
        """
        self._ready()
        held = self._held_out
        if not held:  # val_size 0: the ID test split validates, no training image
            return []
        mine = f"val_size={self.val_size}, val_seed={self.val_seed}"
        notes = [
            f"{source} records no training split (written before lightning-ood recorded it), "
            f"so this run cannot check that its {len(held)} held-out training images "
            f"(data.init_args.{mine}), which calibrate the thresholds and tune, were not "
            "trained on; if the network was trained with another val_size/val_seed, pass those"
            for source in unrecorded
        ]
        for rec in records:
            if not isinstance(rec, Mapping) or rec.get("id_set") != self.id_name:
                continue  # trained on another ID set: none of these images
            try:
                n, k, seed = int(rec["train_size"]), int(rec["val_size"]), int(rec["val_seed"])
                every = int(rec.get("train_every", 1))
            except (KeyError, TypeError, ValueError):
                k = n = every = -1
            if not (0 <= k < n and every >= 1):
                notes.append(f"{where}: unreadable training-split record {rec!r}; not checked")
                continue
            if n != self._train_size:
                notes.append(
                    f"{where} was trained on {n} {self.display_name} training images, this run "
                    f"reads {self._train_size}: another copy of the data, whose held-out "
                    "images cannot be checked against the trained ones"
                )
                continue
            seen = trained_indices(n, k, seed, every)
            overlap = sum(1 for i in held if i in seen)
            if overlap:
                hint = (
                    " (val_size 0 holds nothing out: thresholds are then calibrated on the ID "
                    "test split; to tune, train again with val_size > 0)"
                    if k == 0
                    else ""
                )
                raise ValueError(
                    f"{where} was trained with data.init_args.val_size={k}, val_seed={seed} "
                    f"(train_every={every}: {len(seen)} of the {n} {self.display_name} training "
                    f"images), but this run holds out {mine} to calibrate thresholds, tune and "
                    f"validate: {overlap} of its {len(held)} held-out images were trained on. "
                    f"Use the training split: --data.init_args.val_size {k} "
                    f"--data.init_args.val_seed {seed}{hint}"
                )
        return notes

    def _ready(self) -> dict[str, Dataset]:
        if self._sets is None:
            self.setup()
        assert self._sets is not None
        return self._sets

    # -- loaders ------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, persistent: bool = False) -> DataLoader:
        """An evaluation loader: dataset order, this rank's unpadded shard (every sample is
        seen exactly once over all ranks; see :class:`EvalShardedSampler`)."""
        rank, world = rank_and_world(self._trainer_or_none())
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=EvalShardedSampler(dataset, num_replicas=world, rank=rank),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        """Training set, training transform (augmented where the recipe augments), shuffled.

        The order is one permutation per epoch seeded by ``shuffle_seed`` (default: the
        ``seed_everything`` seed) and sharded over the ranks, so the data order does not
        depend on the number of devices (per-rank batch ``b`` on ``w`` ranks = batch ``w*b``
        on one), and the loader is resumable mid-epoch (:class:`ResumableDataLoader`).
        With ``outlier_set``: a ``CombinedLoader({"id", "outliers"}, "max_size_cycle")`` whose
        outlier loader reads a seeded permutation of the (cycled) outlier set, as many batches
        as the ID loader (so the ID set is never cycled).
        """
        rank, world = rank_and_world(self._trainer_or_none())
        ds = self._ready()["train"]
        seed = self.shuffle_seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        loader = ResumableDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=ShardedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if self.outlier_spec is None:
            return loader
        if self._outliers is None:
            root, _ = self.resolved_root()
            self._outliers = build_ood_dataset(
                self.outlier_spec, root, self.input_shape, self.normalization
            )
        # One outlier batch per ID batch: the outlier set is cycled to that many samples.
        need = len(loader) * self.outlier_batch_size * world
        n_out = len(self._outliers)  # type: ignore[arg-type]
        cycled = Subset(ConcatDataset([self._outliers] * math.ceil(need / n_out)), range(need))
        outliers = ResumableDataLoader(
            cycled,
            batch_size=self.outlier_batch_size,
            sampler=ShardedSampler(cycled, num_replicas=world, rank=rank, shuffle=True, seed=seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        return CombinedLoader({"id": loader, "outliers": outliers}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        """ID validation set (the ID test set unless ``val_size`` > 0), eval transform."""
        return self._loader(self._ready()["val"], persistent=True)

    def test_dataloader(self) -> list[DataLoader]:
        """``[ID test, *OOD sets]`` in ``test_set_names`` order; eval transform, no shuffle."""
        sets = self._ready()
        return [self._loader(sets["test"]), *(self._loader(ds) for ds in self._ood)]

    @property
    def predict_set_names(self) -> list[str]:
        """``[id_name, *predict_sets names]``, in the order of :meth:`predict_dataloader`."""
        return [self.id_name, *(s.name for s in self.predict_specs)]

    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        """The ID test set, then every ``predict_sets`` entry (a list when there are any).

        A ``predict_sets`` entry is scored whole: ``ood_every`` thins the reported OOD sets of
        a fast run, never the files a user asked to score; an entry takes its own ``every``
        for a slice.
        """
        sets = self._ready()
        if not self.predict_specs:
            return self._loader(sets["test"])
        root, _ = self.resolved_root()
        extra = [self._loader(self._build_predict(s, root)) for s in self.predict_specs]
        return [self._loader(sets["test"]), *extra]

    def _build_predict(self, spec: OODSpec, root: Path) -> Dataset:
        """One ``predict_sets`` entry: every sample unless the entry's own ``every`` slices it."""
        return build_ood_dataset(
            spec,
            root,
            self.input_shape,
            self.normalization,
            every=1,
            split="test",
            corruption=self.test_corruption,
        )

    def train_eval_dataloader(self) -> DataLoader:
        """The training set under the EVAL transform, in order: the detector-fitting pass
        (not Lightning's training loader, which augments and shuffles)."""
        return self._loader(self._ready()["fit"])

    def fit_dataloader(self) -> DataLoader:
        """Deprecated name of :meth:`train_eval_dataloader`."""
        warnings.warn(
            "fit_dataloader() is deprecated; call train_eval_dataloader() (the training set "
            "under the eval transform)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.train_eval_dataloader()

    def val_ood_dataloaders(self) -> dict[str, DataLoader]:
        """Tuning-only OOD sets by name (never part of the reported tables)."""
        self._ready()
        return {name: self._loader(ds) for name, ds in self._val_ood.items()}
