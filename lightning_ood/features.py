"""Opt-in on-disk cache of backbone outputs, so re-scoring a detector needs no network pass.

One entry holds, for every sample of one dataset, the penultimate features, the logits, the
requested taps and the targets, exactly as ``OODBackbone.extract`` produced them (same dtype,
so a hit is bit-identical to recomputing). Entries are keyed by *what* produced them, never by
a file name:

* the backbone's weights: a SHA-256 over the raw bytes of every parameter and buffer in sorted
  key order (so fine-tuning one bias, or loading another checkpoint, changes the key);
* the dataset: class, length, scalar attributes (folders resolved), settings held as
  dataclasses (a ``test_corruption`` spec: another severity is another entry), a hash of its
  tensors and file lists, the files themselves (path, size and modification time of each,
  plus their bytes for sets up to :data:`CONTENT_HASH_MAX_BYTES`, so images replaced under
  the same names are another entry), and the same for every wrapped dataset, ``Subset``
  indices included (so every-k-th slices are told apart);
* the transforms: the ``repr`` of every ``*transform*`` attribute along the wrapper chain (a
  ``Normalize`` with other constants is another entry);
* the tap set.

Layout: ``<root>/<base>/taps-<hash>.pt`` where ``<base>`` hashes (weights, dataset,
transform). An entry whose tap set is a superset of the requested one is served too. Writes go
to a temporary file in the same folder and are renamed into place, so an interrupted run never
leaves a half-written entry. Loads use ``torch.load(weights_only=True)``: a cache file is data.

A dataset whose outputs do not fit in memory (ImageNet: 1.28 M x 2048 features) is stored
*sharded* (``shard_rows``): the ``.pt`` entry is then a small index and the rows live in
``taps-<hash>.shards/shard-<i>.pt``, written through a temporary folder that is renamed into
place before the index; :class:`ShardedFeatures` streams them one shard at a time, so fitting
from it holds at most two shards in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_ood.detectors.base import Detector
from lightning_ood.engine import (
    check_feature_only,
    eval_pass,
    fit_detectors,
    module_device,
    score_stream,
)
from lightning_ood.io import atomic_save
from lightning_ood.models.base import FEATURES, LOGITS, BackboneOutput

#: Bumped when the stored layout changes; part of every key, so old entries are never misread.
FORMAT_VERSION = 1


# -- stored features -----------------------------------------------------------------------------
@dataclass
class CachedFeatures:
    """Backbone outputs for a whole dataset, on the CPU, in the order the loader yielded them.

    Attributes:
        features: penultimate features h(x), (N, q).
        logits: classifier outputs, (N, L).
        taps: requested intermediate outputs by tap name, each (N, ...), unflattened.
        targets: labels, (N,) int64 (-1 where the loader yielded none).
        meta: provenance (cache key, dataset/transform ids, taps, shapes, torch version).
        from_cache: whether this object was read from disk (not stored).
    """

    features: Tensor
    logits: Tensor
    taps: dict[str, Tensor]
    targets: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        sizes = {"logits": self.logits.shape[0], "targets": self.targets.shape[0]}
        sizes.update({f"taps[{k!r}]": v.shape[0] for k, v in self.taps.items()})
        bad = {k: s for k, s in sizes.items() if s != n}
        if bad:
            raise ValueError(
                f"CachedFeatures: every tensor needs the {n} rows of `features`; got {bad}"
            )

    def __len__(self) -> int:
        return self.features.shape[0]

    def output(self, device: torch.device | str | None = None) -> BackboneOutput:
        """All samples as one :class:`BackboneOutput`."""
        return BackboneOutput(
            self.features.to(device),
            self.logits.to(device),
            {k: v.to(device) for k, v in self.taps.items()},
        )

    def as_batches(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[BackboneOutput, Tensor]]:
        """Yield ``(BackboneOutput, targets)`` chunks, as the eval pass would have produced."""
        if batch_size < 1:
            raise ValueError(f"as_batches: batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            out = BackboneOutput(
                self.features[sl].to(device),
                self.logits[sl].to(device),
                {k: v[sl].to(device) for k, v in self.taps.items()},
            )
            yield out, self.targets[sl].to(device)

    def subset(self, index: Tensor | Sequence[int]) -> CachedFeatures:
        """The rows ``index`` (e.g. a seeded validation half), sharing ``meta``."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return CachedFeatures(
            self.features[idx],
            self.logits[idx],
            {k: v[idx] for k, v in self.taps.items()},
            self.targets[idx],
            {**self.meta, "rows": int(idx.numel())},
            self.from_cache,
        )

    def select_taps(self, taps: Sequence[str]) -> CachedFeatures:
        """A view holding only ``taps`` (features and logits are always kept)."""
        wanted = _hooked(taps)
        missing = [t for t in wanted if t not in self.taps]
        if missing:
            raise KeyError(f"taps {missing} are not stored; stored taps: {sorted(self.taps)}")
        return CachedFeatures(
            self.features,
            self.logits,
            {t: self.taps[t] for t in wanted},
            self.targets,
            {**self.meta, "taps": wanted},
            self.from_cache,
        )


class ShardedFeatures:
    """A cache entry stored in shards, streamed one shard at a time (bounded memory).

    Offers what fitting and scoring need from :class:`CachedFeatures` (``len``,
    :meth:`as_batches`, :meth:`select_taps`) without holding every row; :meth:`load` gathers
    everything into one :class:`CachedFeatures` for entries that do fit in memory.

    Attributes:
        folder: the shard folder.
        shards: ``[{"file": name, "rows": n}, ...]`` in row order.
        meta: provenance, as :attr:`CachedFeatures.meta` (``"taps"``: the taps served).
    """

    def __init__(
        self,
        folder: Path,
        shards: list[dict[str, Any]],
        meta: dict[str, Any],
        from_cache: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.shards = [dict(s) for s in shards]
        self.meta = dict(meta)
        #: Whether the entry was there before (False right after :meth:`FeatureCache.save_stream`).
        self.from_cache = from_cache

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.shards)

    @property
    def taps(self) -> list[str]:
        return list(self.meta.get("taps", []))

    def _shard(self, entry: dict[str, Any]) -> CachedFeatures:
        path = self.folder / entry["file"]
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"feature cache shard {path} is missing: the entry {self.folder} is incomplete; "
                "delete the folder and its index (.pt beside it) to recompute it"
            ) from err
        taps = {t: obj["taps"][t] for t in self.taps}
        if obj["features"].shape[0] != int(entry["rows"]):
            raise ValueError(
                f"feature cache shard {path} holds {obj['features'].shape[0]} rows, its index "
                f"says {entry['rows']}; delete the entry to recompute it"
            )
        return CachedFeatures(obj["features"], obj["logits"], taps, obj["targets"], self.meta)

    def as_batches(
        self, batch_size: int, device: torch.device | str | None = None
    ) -> Iterator[tuple[BackboneOutput, Tensor]]:
        """Yield ``(BackboneOutput, targets)`` chunks shard by shard (a batch never spans two
        shards); only the current shard (and the batch still held by the caller) is in
        memory."""
        if batch_size < 1:
            raise ValueError(f"as_batches: batch_size must be >= 1, got {batch_size}")
        for entry in self.shards:
            shard = self._shard(entry)
            yield from shard.as_batches(batch_size, device)
            del shard

    def select_taps(self, taps: Sequence[str]) -> ShardedFeatures:
        """A view serving only ``taps`` (features and logits are always kept)."""
        wanted = _hooked(taps)
        missing = [t for t in wanted if t not in self.taps]
        if missing:
            raise KeyError(f"taps {missing} are not stored; stored taps: {sorted(self.taps)}")
        meta = {**self.meta, "taps": wanted}
        return ShardedFeatures(self.folder, self.shards, meta, self.from_cache)

    def load(self) -> CachedFeatures:
        """Every row in memory as one :class:`CachedFeatures` (small entries only)."""
        parts = [self._shard(e) for e in self.shards]
        return CachedFeatures(
            torch.cat([p.features for p in parts]),
            torch.cat([p.logits for p in parts]),
            {t: torch.cat([p.taps[t] for p in parts]) for t in self.taps},
            torch.cat([p.targets for p in parts]),
            dict(self.meta),
            True,
        )


class ShardWriter:
    """Write backbone outputs as shards of ``shard_rows`` rows into a temporary folder beside
    ``folder``, renamed into place by :meth:`close`; :meth:`abort` (or an exception inside a
    ``with`` block) removes it, so no half-written entry is ever left."""

    def __init__(self, folder: Path, shard_rows: int) -> None:
        if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        self.folder = Path(folder)
        self.shard_rows = shard_rows
        self.tmp = self.folder.with_name(f".{self.folder.name}.tmp-{uuid.uuid4().hex[:12]}")
        self.tmp.mkdir(parents=True)
        self.shards: list[dict[str, Any]] = []
        self._pending: list[tuple[BackboneOutput, Tensor]] = []
        self._rows = 0
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, out: BackboneOutput, targets: Tensor) -> None:
        """Append one batch (moved to the CPU); a full shard is written at once."""
        cpu = BackboneOutput(
            out.features.detach().cpu(),
            out.logits.detach().cpu(),
            {k: v.detach().cpu() for k, v in out.taps.items()},
        )
        self._pending.append((cpu, targets.reshape(-1).long().cpu()))
        self._rows += cpu.features.shape[0]
        while self._rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, rows: int) -> None:
        outs = [o for o, _ in self._pending]
        whole = CachedFeatures(
            torch.cat([o.features for o in outs]),
            torch.cat([o.logits for o in outs]),
            {k: torch.cat([o.taps[k] for o in outs]) for k in outs[0].taps},
            torch.cat([t for _, t in self._pending]),
        )
        head = whole.subset(torch.arange(rows))
        name = f"shard-{len(self.shards):05d}.pt"
        obj = {
            "features": head.features.contiguous(),
            "logits": head.logits.contiguous(),
            "taps": {k: v.contiguous() for k, v in head.taps.items()},
            "targets": head.targets.contiguous(),
        }
        torch.save(obj, self.tmp / name)
        self.shards.append({"file": name, "rows": rows})
        if not self.shapes:
            self.shapes = {
                "features": list(head.features.shape[1:]),
                "logits": list(head.logits.shape[1:]),
                **{f"taps.{k}": list(v.shape[1:]) for k, v in head.taps.items()},
            }
            self.dtypes = {"features": str(head.features.dtype), "logits": str(head.logits.dtype)}
        rest = whole.subset(torch.arange(rows, len(whole)))
        self._pending = (
            [(BackboneOutput(rest.features, rest.logits, rest.taps), rest.targets)]
            if len(rest)
            else []
        )
        self._rows = len(rest)

    def close(self) -> list[dict[str, Any]]:
        """Write the last partial shard and move the folder into place; returns the shards."""
        if self._rows:
            self._flush(self._rows)
        if not self.shards:
            self.abort()
            raise ValueError("no rows were written: the stream yielded no batch")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)
        return self.shards

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _hooked(taps: Sequence[str]) -> list[str]:
    """Tap names that need a hook (features/logits are always stored), deduplicated, sorted."""
    if isinstance(taps, str):
        raise TypeError(f"taps must be a list of tap names, got the string {taps!r}")
    return sorted({t for t in taps if t not in (FEATURES, LOGITS)})


# -- identities ----------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (any dtype, including bfloat16), C-contiguous on the CPU."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def backbone_fingerprint(backbone: nn.Module) -> str:
    """SHA-256 of the module class and every state_dict tensor (name, dtype, shape, bytes).

    Keys follow the weights, not a checkpoint's file name: the same weights loaded from two
    files share entries, and any changed parameter or BatchNorm statistic gives a new key.
    """
    h = hashlib.sha256()
    h.update(f"{type(backbone).__module__}.{type(backbone).__qualname__}\0".encode())
    state = backbone.state_dict()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, Tensor):  # extra state objects
            h.update(f"{name}\0{t!r}\0".encode())
            continue
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _digest(value: Any) -> str:
    """Short SHA-256 of a sample list, tensor or array."""
    h = hashlib.sha256()
    if isinstance(value, Tensor):
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()[:16]


#: Values whose ``repr`` is stable across processes.
_SCALARS = (str, int, float, bool, type(None), range)
#: Attribute names holding a folder or file; resolved so two spellings share entries.
_PATH_ATTRS = ("root", "path", "folder", "dir", "data_dir", "images_file", "labels_file")
#: Nesting bound for dataset wrappers (guards against reference cycles).
_MAX_DEPTH = 8
#: Attribute names of a dataset's image-file list (``ImageFiles.files``, ``ImageFolder.samples``
#: and its alias ``imgs``); lists of ``os.PathLike`` count under any name.
_FILE_LIST_ATTRS = ("files", "samples", "imgs")
#: File sets holding at most this many bytes together enter the key with their contents (one
#: SHA-256 pass; measured for CIFAR-10's 10,000 test JPEGs: 0.2 s from the page cache, 1 s
#: cold); larger ones with each file's size and modification time only (one ``stat`` each).
CONTENT_HASH_MAX_BYTES = 256 * 2**20


def _file_list(name: str, value: Any) -> list[str] | None:
    """The absolute paths of a file-list attribute (entries may be ``(path, label)``), or None."""
    if not isinstance(value, list | tuple) or not value:
        return None
    items = [v[0] if isinstance(v, tuple) and v else v for v in value]
    if all(isinstance(p, os.PathLike) for p in items) or (
        name in _FILE_LIST_ATTRS and all(isinstance(p, str | os.PathLike) for p in items)
    ):
        return [os.path.abspath(p) for p in items]
    return None


def files_fingerprint(paths: Sequence[str | os.PathLike[str]]) -> str:
    """SHA-256 of a file list as the tensors depend on it: each file's absolute path, size and
    modification time (ns), and, when the files hold at most :data:`CONTENT_HASH_MAX_BYTES`
    together, their bytes (so a file rewritten with the same size and mtime is caught too).
    A missing or unreadable file enters as such (the loader will name it)."""
    stats: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append(None)
    content = sum(st[0] for st in stats if st is not None) <= CONTENT_HASH_MAX_BYTES
    h = hashlib.sha256(f"files; content={content}\0".encode())
    for p, st in zip(paths, stats, strict=True):
        h.update(f"{os.path.abspath(p)}\0{st}\0".encode())
        if content and st is not None:
            try:
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            except OSError as err:
                h.update(f"unreadable: {type(err).__name__}".encode())
    return h.hexdigest()[:32]


def _stable_list(value: list | tuple) -> bool:
    """Whether a list's repr is deterministic (paths, labels, (path, label) pairs)."""
    ok = (*_SCALARS, os.PathLike)
    return all(
        isinstance(v, ok) or (isinstance(v, tuple) and all(isinstance(e, ok) for e in v))
        for v in value
    )


def _dataset_list(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Dataset) for v in value)
    )


def _array_list(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Tensor | np.ndarray) for v in value)
    )


def _attrs(obj: Any) -> list[tuple[str, Any]]:
    return sorted((k, v) for k, v in getattr(obj, "__dict__", {}).items() if not k.startswith("_"))


def describe_dataset(dataset: Dataset, _depth: int = 0) -> dict[str, Any]:
    """A JSON-able description that changes whenever the samples a dataset yields change.

    Generic: the class, the length, every public scalar attribute (folders resolved), the
    ``repr`` of every dataclass attribute (settings such as a corruption spec), a hash of every
    tensor/array/sample-list attribute and of every tensor in a tuple of them (images, labels,
    ``TensorDataset.tensors``, file lists, crop offsets, ``Subset`` indices), the files of
    every file list (:func:`files_fingerprint`: sizes, modification times and, for small sets,
    contents), and wrapped datasets recursively. Attributes whose
    name contains ``transform`` are left to :func:`describe_transforms`. A dataset may define
    ``cache_id`` (a string or a no-argument method) to replace all this.
    """
    own = getattr(dataset, "cache_id", None)
    if own is not None:
        return {"cache_id": own() if callable(own) else str(own)}
    cls = type(dataset)
    desc: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    try:
        desc["len"] = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        desc["len"] = None
    if _depth >= _MAX_DEPTH:
        return desc
    fingerprints: dict[int, str] = {}  # ImageFolder's imgs is its samples list
    for k, v in _attrs(dataset):
        if "transform" in k:
            continue
        paths = _file_list(k, v)
        if paths is not None:
            if id(v) not in fingerprints:
                fingerprints[id(v)] = files_fingerprint(paths)
            desc[f"{k}#files"] = fingerprints[id(v)]
        if isinstance(v, Dataset):
            desc[k] = describe_dataset(v, _depth + 1)
        elif _dataset_list(v):
            desc[k] = [describe_dataset(d, _depth + 1) for d in v]
        elif isinstance(v, os.PathLike) or (isinstance(v, str) and k in _PATH_ATTRS):
            desc[k] = str(Path(v).resolve())
        elif isinstance(v, _SCALARS):
            desc[k] = v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
        elif isinstance(v, Tensor | np.ndarray) or (
            isinstance(v, list | tuple) and _stable_list(v)
        ):
            desc[f"{k}#sha"] = _digest(v)
        elif _array_list(v):  # TensorDataset.tensors: (images, labels)
            desc[f"{k}#sha"] = [_digest(t) for t in v]
        elif dataclasses.is_dataclass(v) and not isinstance(v, type) and " at 0x" not in repr(v):
            desc[k] = repr(v)  # a settings record, e.g. Corrupted's CorruptionSpec
    return desc


def describe_transforms(dataset: Dataset, _depth: int = 0) -> dict[str, Any]:
    """The ``repr`` of every ``*transform*`` attribute along a chain of dataset wrappers."""
    out: dict[str, Any] = {}
    if _depth >= _MAX_DEPTH:
        return out
    for k, v in _attrs(dataset):
        if "transform" in k:
            out[k] = repr(v)
        elif isinstance(v, Dataset):
            sub = describe_transforms(v, _depth + 1)
            if sub:
                out[k] = sub
        elif _dataset_list(v):
            subs = [describe_transforms(d, _depth + 1) for d in v]
            if any(subs):
                out[k] = subs
    return out


def describe_loader(loader: DataLoader) -> tuple[str, str]:
    """``(dataset_id, transform_id)`` strings for :meth:`FeatureCache.get_or_compute`.

    The batch size and worker count are not part of them: in eval mode they do not change
    what the network computes.
    """
    dataset = loader.dataset
    dataset_id = json.dumps(describe_dataset(dataset), sort_keys=True, default=str)
    transform_id = json.dumps(describe_transforms(dataset), sort_keys=True, default=str)
    name = type(dataset).__name__
    if " at 0x" in transform_id:
        warnings.warn(
            f"a transform of {name} has no stable repr ({transform_id[:200]}); its cache "
            "entries will never be found again. Give it a __repr__ or pass transform_id=",
            stacklevel=2,
        )
    elif "Random" in transform_id:
        warnings.warn(
            f"a transform of {name} looks random ({transform_id[:200]}); cached features "
            "freeze one draw of it",
            stacklevel=2,
        )
    return dataset_id, transform_id


# -- computing -----------------------------------------------------------------------------------
def compute_features(
    backbone: nn.Module,
    loader: DataLoader,
    taps: Sequence[str] = (),
    progress: bool = False,
    desc: str = "features",
) -> CachedFeatures:
    """Backbone outputs of every sample of ``loader``, on the CPU: one
    :func:`lightning_ood.engine.eval_pass` (eval mode, one no-grad forward per batch)."""
    hooked = _hooked(taps)
    chunks: dict[str, list[Tensor]] = {"features": [], "logits": [], "targets": []}
    tap_chunks: dict[str, list[Tensor]] = {t: [] for t in hooked}
    for x, y, out in eval_pass(backbone, loader, hooked, progress=progress, desc=desc):  # type: ignore[arg-type]
        chunks["features"].append(out.features.cpu())
        chunks["logits"].append(out.logits.cpu())
        if y is None:
            y = torch.full((x.shape[0],), -1, dtype=torch.long)
        chunks["targets"].append(y.reshape(-1).long().cpu())
        for t in hooked:
            tap_chunks[t].append(out.taps[t].cpu())
    if not chunks["features"]:
        raise ValueError(
            f"the loader over {type(loader.dataset).__name__} yielded no batch; check the "
            "dataset path and subset"
        )
    return CachedFeatures(
        torch.cat(chunks["features"]),
        torch.cat(chunks["logits"]),
        {t: torch.cat(c) for t, c in tap_chunks.items()},
        torch.cat(chunks["targets"]),
        {"taps": hooked},
    )


def fit_from_cache(
    detectors: Iterable[Detector],
    backbone: nn.Module,
    train: CachedFeatures | ShardedFeatures | None,
    batch_size: int = 4096,
    *,
    finalize: bool = True,
) -> None:
    """:func:`lightning_ood.engine.fit_detectors` from cached training features: the same
    state as an eval pass over the training loader, without the network pass."""
    dets = list(detectors)
    device = module_device(backbone)
    for det in dets:
        det.to(device)
    outputs = None if train is None else (lambda: train.as_batches(batch_size, device))
    fit_detectors(dets, backbone, outputs, finalize=finalize)  # type: ignore[arg-type]


def score_cached(
    detectors: Mapping[str, Detector],
    cached: CachedFeatures | ShardedFeatures,
    batch_size: int = 4096,
    *,
    components: bool = False,
) -> dict[str, Tensor]:
    """Every detector's scores of the cached samples (float64, CPU) through
    :func:`lightning_ood.engine.score_stream`; detectors needing input gradients are
    refused (features carry no inputs)."""
    for det in detectors.values():
        check_feature_only(det)
    device = next(iter(detectors.values())).fitted.device if detectors else None
    batches = ((None, out) for out, _ in cached.as_batches(batch_size, device))
    return score_stream(detectors, batches, components=components)


# -- the cache -----------------------------------------------------------------------------------
def _slug(text: str) -> str:
    """A readable folder prefix from a dataset id: innermost class, outermost length."""
    try:
        d = json.loads(text)
    except (TypeError, ValueError):
        d = None
    if not isinstance(d, dict):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40].strip("_.") or "dataset"
    n = d.get("len")
    while isinstance(d.get("dataset"), dict):
        d = d["dataset"]
    raw = f"{str(d.get('class', 'dataset')).rsplit('.', 1)[-1]}-{n}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)[:40].strip("_.") or "dataset"


class FeatureCache:
    """Backbone outputs on disk, keyed by (weights, dataset, transform, taps).

    Args:
        root: cache folder (created on first write), e.g. ``.cache/features``.

    Attributes:
        hits / misses: counters of :meth:`get_or_compute` outcomes (for logs and tests).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    # -- keys ---------------------------------------------------------------------------------
    @staticmethod
    def base_key(weights: str, dataset_id: str, transform_id: str) -> str:
        """SHA-256 over the format version, weight fingerprint, dataset and transform ids."""
        payload = json.dumps(
            {
                "format": FORMAT_VERSION,
                "weights": weights,
                "dataset": dataset_id,
                "transform": transform_id,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    @staticmethod
    def taps_key(taps: Sequence[str]) -> str:
        return hashlib.sha256(json.dumps(_hooked(taps)).encode()).hexdigest()[:16]

    def entry_path(
        self, weights: str, dataset_id: str, transform_id: str, taps: Sequence[str] = ()
    ) -> Path:
        """Where the entry for these identities lives (whether or not it exists)."""
        base = self.base_key(weights, dataset_id, transform_id)
        folder = self.root / f"{_slug(dataset_id)}-{base[:24]}"
        return folder / f"taps-{self.taps_key(taps)}.pt"

    # -- read/write ---------------------------------------------------------------------------
    def _read(
        self, path: Path, expect: Mapping[str, Any], taps: Sequence[str]
    ) -> CachedFeatures | ShardedFeatures | None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a foreign or damaged file: recompute and replace it
            warnings.warn(
                f"feature cache entry {path} is unreadable ({err}); recomputing", stacklevel=3
            )
            return None
        meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
        if any(meta.get(k) != v for k, v in expect.items()):
            warnings.warn(
                f"feature cache entry {path} does not match its key; recomputing", stacklevel=3
            )
            return None
        if "shards" in obj:
            folder = path.with_suffix(".shards")
            names = [e.get("file") if isinstance(e, dict) else None for e in obj["shards"]]
            if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")
                       for n in names):  # fmt: skip
                warnings.warn(  # the index is data: it names files inside its folder only
                    f"feature cache entry {path} names shards outside {folder}; recomputing",
                    stacklevel=3,
                )
                return None
            missing = [e["file"] for e in obj["shards"] if not (folder / e["file"]).is_file()]
            if missing:
                warnings.warn(
                    f"feature cache entry {path} lacks shards {missing[:3]} in {folder}; "
                    "recomputing",
                    stacklevel=3,
                )
                return None
            sharded = ShardedFeatures(folder, obj["shards"], meta)
            return sharded if set(_hooked(taps)) == set(sharded.taps) else sharded.select_taps(taps)
        cached = CachedFeatures(
            obj["features"], obj["logits"], obj["taps"], obj["targets"], meta, True
        )
        if set(_hooked(taps)) != set(cached.taps):
            cached = cached.select_taps(taps)
        return cached

    def load(
        self, weights: str, dataset_id: str, transform_id: str, taps: Sequence[str] = ()
    ) -> CachedFeatures | ShardedFeatures | None:
        """The stored entry for these identities (or one storing a superset of ``taps``)."""
        path = self.entry_path(weights, dataset_id, transform_id, taps)
        expect = {"weights": weights, "dataset_id": dataset_id, "transform_id": transform_id}
        if path.is_file():
            hit = self._read(path, {**expect, "taps": _hooked(taps)}, taps)
            if hit is not None:
                return hit
        if not path.parent.is_dir():
            return None
        wanted = set(_hooked(taps))
        for other in sorted(path.parent.glob("taps-*.pt")):
            if other == path:
                continue
            try:  # mmap: read the metadata without loading the tensors
                meta = torch.load(other, map_location="cpu", weights_only=True, mmap=True)["meta"]
            except Exception:
                continue
            if wanted <= set(meta.get("taps", [])):
                hit = self._read(other, expect, taps)
                if hit is not None:
                    return hit
        return None

    def save(
        self, cached: CachedFeatures, weights: str, dataset_id: str, transform_id: str
    ) -> Path:
        """Store ``cached`` atomically; returns the entry path."""
        taps = _hooked(list(cached.taps))
        path = self.entry_path(weights, dataset_id, transform_id, taps)
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = {
            "features": list(cached.features.shape),
            "logits": list(cached.logits.shape),
            **{f"taps.{k}": list(v.shape) for k, v in cached.taps.items()},
        }
        dtypes = {"features": str(cached.features.dtype), "logits": str(cached.logits.dtype)}
        meta = self._meta(weights, dataset_id, transform_id, taps, len(cached), shapes, dtypes)
        obj = {
            "meta": meta,
            "features": cached.features.contiguous(),
            "logits": cached.logits.contiguous(),
            "taps": {k: v.contiguous() for k, v in cached.taps.items()},
            "targets": cached.targets.contiguous(),
        }
        atomic_save(obj, path)
        cached.meta = {**cached.meta, **meta}
        return path

    @staticmethod
    def _meta(
        weights: str,
        dataset_id: str,
        transform_id: str,
        taps: list[str],
        rows: int,
        shapes: dict[str, list[int]],
        dtypes: dict[str, str],
    ) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "weights": weights,
            "dataset_id": dataset_id,
            "transform_id": transform_id,
            "taps": taps,
            "rows": rows,
            "shapes": shapes,
            "dtypes": dtypes,
            "torch": str(torch.__version__),
        }

    def save_stream(
        self,
        batches: Iterable[tuple[BackboneOutput, Tensor | None]],
        weights: str,
        dataset_id: str,
        transform_id: str,
        taps: Sequence[str] = (),
        shard_rows: int = 65536,
    ) -> ShardedFeatures:
        """Store a stream of ``(outputs, targets)`` batches as a sharded entry, in bounded
        memory (at most one shard plus one batch); returns it, ready to stream. Targets of
        ``None`` are stored as -1. The entry appears only once every shard is written."""
        hooked = _hooked(taps)
        path = self.entry_path(weights, dataset_id, transform_id, hooked)
        path.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(path.with_suffix(".shards"), shard_rows) as writer:
            for out, y in batches:
                missing = [t for t in hooked if t not in out.taps]
                if missing:
                    raise KeyError(f"save_stream: the batches lack the taps {missing}")
                out = BackboneOutput(out.features, out.logits, {t: out.taps[t] for t in hooked})
                n = out.features.shape[0]
                writer.add(out, torch.full((n,), -1, dtype=torch.long) if y is None else y)
            shards = writer.close()
        rows = sum(e["rows"] for e in shards)
        shapes = {k: [rows, *v] for k, v in writer.shapes.items()}
        meta = self._meta(weights, dataset_id, transform_id, hooked, rows, shapes, writer.dtypes)
        atomic_save({"meta": meta, "shards": shards}, path)
        return ShardedFeatures(path.with_suffix(".shards"), shards, meta, from_cache=False)

    def get_or_compute(
        self,
        backbone: nn.Module,
        loader: DataLoader,
        taps: Sequence[str] = (),
        dataset_id: str | None = None,
        transform_id: str | None = None,
        progress: bool = True,
        desc: str = "features",
        shard_rows: int | None = None,
    ) -> CachedFeatures | ShardedFeatures:
        """Read the entry for (weights, dataset, transform, taps), or compute and store it.

        A hit runs no forward pass. ``dataset_id``/``transform_id`` default to
        :func:`describe_loader`; pass them when a dataset's attributes do not identify it.
        With ``shard_rows`` a miss streams the eval pass into shards of that many rows (for
        datasets whose outputs do not fit in memory) and returns :class:`ShardedFeatures`.
        """
        if dataset_id is None or transform_id is None:
            auto_d, auto_t = describe_loader(loader)
            dataset_id = auto_d if dataset_id is None else dataset_id
            transform_id = auto_t if transform_id is None else transform_id
        weights = backbone_fingerprint(backbone)
        hit = self.load(weights, dataset_id, transform_id, taps)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        if shard_rows is not None:
            hooked = _hooked(taps)
            stream = (
                (out, y)
                for _, y, out in eval_pass(backbone, loader, hooked, progress=progress, desc=desc)  # type: ignore[arg-type]
            )
            return self.save_stream(stream, weights, dataset_id, transform_id, hooked, shard_rows)
        cached = compute_features(backbone, loader, taps, progress=progress, desc=desc)
        self.save(cached, weights, dataset_id, transform_id)
        return cached
