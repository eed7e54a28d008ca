"""KNN (Sun et al., ICML 2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"),
and the feature bank + exact chunked top-k search that NNGuide reuses.

The bank holds (a seeded fraction of) the L2-normalised training features z = h/‖h‖; the score
is minus the distance to the k-th nearest bank entry, ``-‖z* - z_(k)‖₂`` (paper Sec. 3, the
decision rule ``G(z*; k) = 1{-r_k(z*) >= λ}`` with r_k that distance). OpenOOD v1.5 and the
authors' code take faiss' ``IndexFlatL2`` distances, which are *squared*: the same ranking, so
the same metrics.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from lightning_ood.detectors.base import (
    Detector,
    InvalidConfiguration,
    OptInput,
    OptModel,
    Reducer,
    exporting,
    truthy,
)
from lightning_ood.detectors.hparams import HParam, choice, in_range, integer
from lightning_ood.detectors.registry import register_detector
from lightning_ood.models.base import BackboneOutput, OODBackbone

BACKENDS = ("auto", "torch", "faiss")
_MASK32 = 0xFFFFFFFF


# -- seeded, split-invariant sampling --------------------------------------------------------
def mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def mix32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with good avalanche) on int64 tensors
    holding values in [0, 2**32); exact integer arithmetic, so identical on every device."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def seed_key(seed: int, device: torch.device | str | None = None) -> Tensor:
    """The two 32-bit words of a (64-bit) ``seed``, mixed: (2,) int64."""
    # Golden-ratio / Murmur constants keep (seed 0, position 0) away from the fixed point 0.
    words = [(seed & _MASK32) ^ 0x9E3779B9, ((seed >> 32) & _MASK32) ^ 0x85EBCA6B]
    return mix32(torch.tensor(words, dtype=torch.int64, device=device))


def seeded_uniform_at(positions: Tensor, seed: int) -> Tensor:
    """Pseudo-random numbers in [0, 1) (float64) for the int64 stream ``positions``.

    A counter-based hash of (seed, position): the value of a sample depends only on its
    position, never on how the stream is cut into batches or shards, and is identical on every
    device.
    """
    idx = positions.to(torch.int64)
    key = seed_key(seed, idx.device)
    x = mix32((idx & _MASK32) ^ key[0])
    x = mix32(x ^ ((idx >> 32) & _MASK32) ^ key[1])
    return x.double() / float(2**32)


def seeded_uniform(
    start: int, n: int, seed: int, device: torch.device | str | None = None
) -> Tensor:
    """:func:`seeded_uniform_at` of the positions ``start .. start + n - 1``."""
    return seeded_uniform_at(torch.arange(start, start + n, dtype=torch.int64, device=device), seed)


def stream_layout() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the initialised ``torch.distributed`` process
    group, ``(0, 1)`` without one.

    Under DDP the fitting stream of rank ``r`` of ``w`` is its
    :class:`~lightning_ood.data.samplers.EvalShardedSampler` shard (what the datamodules'
    ``train_eval_dataloader`` gives): its ``p``-th sample is sample ``r + p * w`` of the
    training set.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_positions(
    seen: int, n: int, layout: tuple[int, int], device: torch.device | str | None = None
) -> Tensor:
    """Training-set positions of the ``n`` samples that follow the first ``seen`` of this
    rank's stream (rank ``r`` of ``w`` reads ``r, r+w, ...``), (n,) int64."""
    rank, world = layout
    return rank + torch.arange(seen, seen + n, dtype=torch.int64, device=device) * world


def check_layout(reducer: Reducer, world: int, owner: str, device: torch.device) -> None:
    """Refuse a ``finalize`` whose ``reducer`` does not gather over the ``world`` ranks the
    fitting streams were numbered for (a process group of ``world`` ranks was initialised,
    so every rank's stream was taken for its shard of the training set)."""
    ranks = reducer.cat(torch.tensor([world], dtype=torch.int64, device=device))
    if ranks.numel() != world or bool((ranks != world).any()):
        raise RuntimeError(
            f"{owner}: the training stream was numbered as the shard of one of {world} "
            f"torch.distributed ranks (sample r + p * w), but finalize's reducer gathered "
            f"{ranks.numel()} rank(s); fit under DDP with a reducer that reduces across the "
            "ranks (the OOD callback's StrategyReducer), each rank reading its "
            "EvalShardedSampler shard, or fit in a process without a process group"
        )


def normalize_rows(h: Tensor) -> Tensor:
    """``h / ‖h‖₂`` per row (KNN's normalised feature z); an all-zero row stays zero.
    OpenOOD's normaliser adds 1e-10 to every entry after dividing, a negligible shift not
    reproduced here."""
    return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)


# -- exact chunked top-k search ---------------------------------------------------------------
def topk_scores(
    queries: Tensor,
    bank: Tensor,
    k: int,
    *,
    offset: Tensor | None = None,
    query_chunk: int | None = 1024,
    bank_chunk: int = 16384,
) -> Tensor:
    """The ``k`` largest values of ``queries @ bank.T - offset`` per query row, descending.

    Exact, in bounded memory: queries in chunks of ``query_chunk`` rows against bank chunks of
    ``bank_chunk`` rows, keeping a running top-k, so at most ``query_chunk x (bank_chunk + k)``
    similarities exist at once (never queries x bank). ``offset`` (N,) is subtracted per bank
    entry (KNN passes ‖b‖²/2, so the top-k are the nearest neighbours in L2).
    ``query_chunk=None`` takes every query at once (a traced program: a Python loop over a
    symbolic batch size would fix it).
    """
    if k > bank.shape[0]:
        raise ValueError(f"k={k} exceeds the {bank.shape[0]} bank entries")
    q = queries.to(bank.dtype)
    out = []
    chunks = [q] if query_chunk is None else q.split(query_chunk)
    for qc in chunks:
        best = qc.new_empty(qc.shape[0], 0)
        for bs in range(0, bank.shape[0], bank_chunk):
            sims = qc @ bank[bs : bs + bank_chunk].T
            if offset is not None:
                sims = sims - offset[bs : bs + bank_chunk]
            cand = torch.cat([best, sims], dim=1)
            best = cand.topk(min(k, cand.shape[1]), dim=1).values
        out.append(best)
    return torch.cat(out) if out else q.new_empty(0, k)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _flat_index(bank: Tensor, offset: Tensor | None) -> Any:
    """A faiss ``IndexFlatIP`` (exact, CPU) over the bank rows; ``offset`` is folded in as one
    extra coordinate, so that ⟨(q, -1), (b, offset)⟩ = q·b - offset."""
    import faiss

    b = bank.detach().float().cpu()
    if offset is not None:
        b = torch.cat([b, offset.detach().float().cpu()[:, None]], dim=1)
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(b.contiguous().numpy())
    return index


def _faiss_topk(queries: Tensor, index: Any, k: int, offset: bool, dtype: torch.dtype) -> Tensor:
    """The top-k similarities of ``queries`` in a :func:`_flat_index` (``offset``: it was
    built with the offset coordinate)."""
    q = queries.detach().float().cpu()
    if offset:
        q = torch.cat([q, -torch.ones(q.shape[0], 1)], dim=1)
    values, _ = index.search(q.contiguous().numpy(), k)
    return torch.from_numpy(values).to(device=queries.device, dtype=dtype)


#: Each bank detector's faiss index, built at its first search after a fit or a load and reused
#: by every later batch (building one copies the whole bank, O(N·d), which per batch cost more
#: than the search itself on small batches). Kept outside the module's state, so copies and
#: pickles of a detector carry none; the entry goes with the detector. It holds a float32 copy
#: of the bank for as long as the detector lives.
_FAISS_INDEXES: weakref.WeakKeyDictionary[Any, tuple[Any, int, Tensor | None, Any]] = (
    weakref.WeakKeyDictionary()
)
_FAISS_LOCK = threading.Lock()


# -- the bank ---------------------------------------------------------------------------------
class BankDetector(Detector):
    """A detector that scores against a bank of (a seeded fraction of) training feature rows.

    Fitting keeps each training sample with probability ``bank_fraction``, decided by
    :func:`seeded_uniform_at` of its position in the training set (under DDP rank ``r`` of
    ``w`` numbers its ``p``-th sample ``r + p * w``, see :func:`stream_layout`), so the bank is
    the same for any batching and any world size; ``finalize`` gathers the ranks' shares with
    their positions (``Reducer.cat``) and orders the bank by position, so the bank buffer
    itself, not only its set of rows, equals one process's. The bank
    size is Binomial(N, bank_fraction), not exactly ``round(N * bank_fraction)``, but never
    below ``min(N, min_bank)``: on a small training set the ``min_bank`` samples of smallest
    draw are kept as well (OpenOOD keeps at least its first training batch), so a fraction
    meant for 50,000 images still leaves ``k`` neighbours on a few thousand. The floor is a
    function of the draws too, so the bank still does not depend on the batching.
    :meth:`check_data` predicts the bank size from the training-set size alone and refuses a
    ``k`` it cannot hold before any training.

    With ``store_bank=False`` the bank is a non-persistent buffer: checkpoints keep only
    ``bank_shape`` (N, q), ``bank_sampling`` (fraction, seed) and ``bank_fingerprint`` (sum and
    position-weighted sum of the entries, to check that a refit rebuilt the same bank); a
    detector loaded that way refuses to score until it is refitted. ``store_bank`` may be
    flipped before saving: it only decides whether ``bank`` enters the state dict.

    Subclasses define :meth:`bank_rows` (what one training batch adds to the bank).
    """

    requires_fit: ClassVar[bool] = True
    k = HParam(
        50, integer(1), stage="score", doc="number of nearest bank entries (k-th / averaged)"
    )
    bank_fraction = HParam(
        1.0,
        in_range(0.0, 1.0, low_open=True, high_open=False),
        doc="fraction of training samples kept in the bank, in (0, 1]",
    )
    seed = HParam(0, integer(0), doc="seed of the bank sampling")
    store_bank = HParam(
        False,
        truthy,
        stage="finalize",
        doc="save the bank in checkpoints (False: metadata only, refit to score)",
    )
    backend = HParam(
        "auto",
        choice(*BACKENDS),
        stage="score",
        doc='"torch" (exact, chunked), "faiss" (exact IndexFlatIP; needs faiss) or "auto" '
        "(faiss when importable, else torch)",
    )
    query_chunk = HParam(1024, integer(1), stage="score", doc="query rows per search chunk")
    bank_chunk = HParam(16384, integer(1), stage="score", doc="bank rows per search chunk")
    min_bank = HParam(
        0,
        integer(0),
        doc="the bank keeps at least this many training samples (all when fewer): the "
        "smallest seeded draws beyond bank_fraction; 0: exactly the fraction",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.backend == "faiss" and not faiss_available():
            raise ImportError(
                f"{type(self).__name__}: backend='faiss' needs the faiss package, which is not "
                "importable here; install faiss-cpu (or faiss-gpu), or use backend='torch' "
                "(exact, chunked) or 'auto' (faiss when available, else torch)"
            )
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("bank_shape", torch.zeros(2, dtype=torch.long))
        self.register_buffer("bank_sampling", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("bank_fingerprint", torch.zeros(2, dtype=torch.float64))
        self._sync_bank_persistence()
        self._chunks: list[Tensor] = []
        self._positions: list[Tensor] = []  # training-set positions of the kept rows
        self._seen = 0
        self._layout = stream_layout()
        # The floor's candidates: the `min_bank` smallest draws not kept by the fraction, as
        # (rows, draws, positions) in stream order.
        self._spare: tuple[Tensor, Tensor, Tensor] | None = None

    # -- what the training set allows ---------------------------------------------------------
    def bank_size(self, num_train: int) -> int:
        """Rows of the bank fitted on ``num_train`` samples, on any world size: the draws
        below ``bank_fraction``, at least ``min(num_train, min_bank)``."""
        if self.bank_fraction >= 1.0:
            return num_train
        kept, step = 0, 1 << 20
        for start in range(0, num_train, step):
            u = seeded_uniform(start, min(step, num_train - start), self.seed)
            kept += int((u < self.bank_fraction).sum())
        return max(kept, min(num_train, self.min_bank))

    def check_data(self, num_train: int) -> None:
        """Refuse a ``k`` larger than the bank ``num_train`` training samples give."""
        size = self.bank_size(num_train)
        if self.k <= size:
            return
        floor = "" if self.bank_fraction >= 1.0 else f", at least min_bank={self.min_bank}"
        if self.k > num_train:
            fix = f"lower k to at most {num_train} (k must not exceed the training samples)"
        else:
            fix = (
                f"lower k to at most {size}, or raise bank_fraction (1.0 keeps all {num_train}) "
                f"or min_bank (to {self.k} or more)"
            )
        raise InvalidConfiguration(
            f"detector {self.name!r} ({type(self).__name__}): k={self.k} exceeds the {size} "
            f"training features its bank would hold (bank_fraction={self.bank_fraction:g} of "
            f"the {num_train} training samples{floor}), so fitting it after training would "
            f"fail. Fix the detector's config: {fix}."
        )

    # -- bank persistence -----------------------------------------------------------------
    def _sync_bank_persistence(self) -> None:
        """``bank`` is a persistent buffer exactly when ``store_bank`` is true; checked when
        the state dict is written or read, so ``store_bank`` may be flipped at any time."""
        if self.store_bank:
            self._non_persistent_buffers_set.discard("bank")
        else:
            self._non_persistent_buffers_set.add("bank")

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        self._sync_bank_persistence()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @property
    def bank_available(self) -> bool:
        """Whether the fitted bank is in memory (False after loading a checkpoint saved with
        ``store_bank=False``)."""
        n, q = self.int_list("bank_shape")
        return n > 0 and tuple(self.bank.shape) == (n, q)

    @property
    def is_fitted(self) -> bool:
        """Fitted AND its bank in memory: a checkpoint saved with ``store_bank: false`` loads
        as unfitted, so ``lightning-ood test`` refits it (one pass) instead of failing."""
        return self.flag("fitted") and self.bank_available

    def check_fitted(self) -> None:
        if self.flag("fitted"):
            self._require_bank()
        else:
            super().check_fitted()

    def _require_bank(self) -> Tensor:
        if not self.flag("fitted"):
            super().check_fitted()
        if not self.bank_available:
            n, q = self.int_list("bank_shape")
            raise RuntimeError(
                f"detector {self.name!r} ({type(self).__name__}) was fitted with a bank of "
                f"{n} x {q} training features, but the bank is not in memory: it was saved with "
                "store_bank: false, which keeps only its metadata. To score, refit it on the "
                "training data (`refit: true` in the OOD callback, or engine.fit_detectors); for "
                "a checkpoint that carries the bank (lightning_ood.load, predict), refit it with "
                "store_bank: true: `lightning-ood test --ckpt_path <checkpoint>` with "
                f"`{self.name}: {{type: {self.kind}, store_bank: true, ...}}` among the OOD "
                "callback's detectors refits it in one pass over the training data and writes "
                "fitted.ckpt with the bank."
            )
        return self.bank

    def _check_k(self, n: int) -> None:
        if self.k > n:
            raise InvalidConfiguration(
                f"{self.name}: k={self.k} exceeds the bank size {n} (training samples kept with "
                f"bank_fraction={self.bank_fraction:g}, at least min_bank={self.min_bank}); "
                "lower k or raise bank_fraction or min_bank"
            )

    # -- fitting --------------------------------------------------------------------------
    def bank_rows(self, out: BackboneOutput) -> Tensor:
        """The bank rows one training batch contributes before sampling, (B, q)."""
        raise NotImplementedError

    def reset(self) -> None:
        self._chunks = []
        self._positions = []
        self._seen = 0
        self._layout = stream_layout()
        self._spare = None
        self.fitted.fill_(False)

    def update(self, out: BackboneOutput, target: Tensor, model: OODBackbone | None = None) -> None:
        rows = self.bank_rows(out).detach()
        if rows.dim() != 2:
            raise ValueError(f"{self.name}: features must be (B, q), got {tuple(rows.shape)}")
        n = rows.shape[0]
        pos = global_positions(self._seen, n, self._layout, rows.device)
        if self.bank_fraction < 1.0:
            u = seeded_uniform_at(pos, self.seed)
            keep = u < self.bank_fraction
            if self.min_bank:
                self._keep_spare(rows[~keep], u[~keep], pos[~keep])
            rows, pos = rows[keep], pos[keep]  # boolean indexing copies
        elif any(rows.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                 for t in (out.features, out.logits, *out.taps.values())):  # fmt: skip
            rows = rows.clone()  # rows that alias the batch's outputs (bank_rows = a view)
        self._seen += n
        if self._chunks and rows.shape[1] != self._chunks[0].shape[1]:
            raise ValueError(
                f"{self.name}: feature width changed from {self._chunks[0].shape[1]} to "
                f"{rows.shape[1]} during fitting"
            )
        self._chunks.append(rows)
        self._positions.append(pos)

    def _keep_spare(self, rows: Tensor, u: Tensor, pos: Tensor) -> None:
        """Merge a batch's unkept rows into the floor's candidates: the ``min_bank`` smallest
        draws so far (ties by position), kept in stream order."""
        if self._spare is not None:
            old_rows, old_u, old_pos = self._spare
            rows = torch.cat([old_rows, rows.to(old_rows.dtype)])
            u, pos = torch.cat([old_u, u]), torch.cat([old_pos, pos])
        if u.numel() > self.min_bank:
            order = torch.sort(u, stable=True).indices[: self.min_bank]  # pos ascends: ties
            order = torch.sort(order).values  # back to stream order
            rows, u, pos = rows[order], u[order], pos[order]
        self._spare = (rows, u, pos)  # boolean indexing copied the rows: no batch is aliased

    def _floor(self, bank: Tensor, reducer: Reducer, width: int) -> Tensor:
        """``bank`` topped up to ``min_bank`` rows (or every sample) with the smallest draws
        of all ranks' candidates (ties by position), appended in position order; every rank
        calls this, so the gathers match."""
        if self.bank_fraction >= 1.0 or bank.shape[0] >= self.min_bank:
            return bank
        if self._spare is None:
            rows = bank.new_zeros(0, width)
            u = torch.zeros(0, dtype=torch.float64, device=bank.device)
            pos = torch.zeros(0, dtype=torch.int64, device=bank.device)
        else:
            rows, u, pos = self._spare
        rows, u = reducer.cat(rows.to(bank.device)), reducer.cat(u.to(bank.device))
        pos = reducer.cat(pos.to(bank.device))
        by_pos = torch.sort(pos).indices  # the ranks' candidates in training-set order
        rows, u = rows[by_pos], u[by_pos]
        need = min(self.min_bank - bank.shape[0], u.numel())
        pick = torch.sort(torch.sort(u, stable=True).indices[:need]).values
        return torch.cat([bank, rows[pick].to(bank.dtype)])

    def finalize(self, model: OODBackbone, reducer: Reducer | None = None) -> None:
        """Gather the kept rows of every rank into the bank, in training-set order (topped up
        to ``min_bank``), and record its metadata."""
        reducer = reducer or Reducer()
        if self._chunks:
            local = self._chunks[0] if len(self._chunks) == 1 else torch.cat(self._chunks)
            pos = torch.cat(self._positions)
        else:  # a rank that saw no batch still joins the gather
            local = self.bank.new_zeros(0, model.num_features)
            pos = torch.zeros(0, dtype=torch.int64, device=local.device)
        self._chunks, self._positions = [local], [pos]  # finalize may run again (grid)
        check_layout(reducer, self._layout[1], self.name, local.device)
        rows, pos = reducer.cat(local), reducer.cat(pos.to(local.device))
        if self._layout[1] > 1:  # the ranks' shares interleave: restore the training order
            rows = rows[torch.sort(pos).indices]
        bank = self._floor(rows, reducer, local.shape[1])
        if bank.shape[0] == 0:
            raise RuntimeError(
                f"{self.name}: the bank is empty: no training sample was kept (seen: "
                f"{self._seen}, bank_fraction={self.bank_fraction:g}); fit on training data or "
                "raise bank_fraction"
            )
        self._check_k(bank.shape[0])
        b = bank.double()
        w = torch.arange(1, b.shape[0] + 1, dtype=torch.float64, device=b.device) / b.shape[0]
        self._forget_index()
        self.bank = bank
        self.bank_shape = torch.tensor(list(bank.shape), dtype=torch.long, device=bank.device)
        self.bank_sampling = torch.tensor(
            [self.bank_fraction, float(self.seed)], dtype=torch.float64, device=bank.device
        )
        self.bank_fingerprint = torch.stack([b.sum(), (b.sum(dim=1) * w).sum()])
        self.fitted.fill_(True)

    def mark_unfitted(self) -> None:
        super().mark_unfitted()
        self._forget_index()
        self.bank = self.bank.new_zeros(0, 0)
        self.bank_shape.zero_()

    # -- search ---------------------------------------------------------------------------
    def _use_faiss(self) -> bool:
        if self.backend == "faiss":
            if not faiss_available():
                raise ImportError(
                    f"{self.name}: backend='faiss' needs the faiss package, which is not "
                    "importable here; install faiss-cpu, or use backend='torch' or 'auto'"
                )
            return True
        return self.backend == "auto" and faiss_available()

    def _faiss_index(self, bank: Tensor, offset: Tensor | None) -> Any:
        """The bank's faiss index: the kept one while the bank is the very tensor it was built
        from (a weak reference: a new tensor at a freed one's address is not mistaken for it),
        unchanged since (its version counter), with the same ``offset``; else a new one
        (:data:`_FAISS_INDEXES`). One lock: threads of a server build it once."""
        with _FAISS_LOCK:
            kept = _FAISS_INDEXES.get(self)
            if kept is not None and kept[0]() is bank and kept[1] == bank._version:
                if offset is None and kept[2] is None:
                    return kept[3]
                if offset is not None and kept[2] is not None and torch.equal(kept[2], offset):
                    return kept[3]
            index = _flat_index(bank, offset)
            kept_offset = None if offset is None else offset.detach().clone()
            _FAISS_INDEXES[self] = (weakref.ref(bank), bank._version, kept_offset, index)
            return index

    def _forget_index(self) -> None:
        """The bank changed (fit, reset, load): the next faiss search builds a new index."""
        with _FAISS_LOCK:
            _FAISS_INDEXES.pop(self, None)

    def search(self, queries: Tensor, offset: Tensor | None = None) -> Tensor:
        """The ``k`` largest ``queries @ bank.T - offset`` per query, descending, (B, k)."""
        bank = self._require_bank()
        self._check_k(bank.shape[0])
        if queries.dim() != 2 or queries.shape[1] != bank.shape[1]:
            raise ValueError(
                f"{self.name}: features must have shape (B, {bank.shape[1]}), got "
                f"{tuple(queries.shape)}; was the detector fitted on another backbone?"
            )
        if exporting():  # traced: torch only, the whole batch as one query chunk
            return topk_scores(queries, bank, self.k, offset=offset, query_chunk=None,
                               bank_chunk=self.bank_chunk)  # fmt: skip
        if queries.shape[0] == 0:
            return bank.new_zeros(0, self.k)
        if self._use_faiss():
            index = self._faiss_index(bank, offset)
            return _faiss_topk(queries, index, self.k, offset is not None, bank.dtype)
        return topk_scores(
            queries,
            bank,
            self.k,
            offset=offset,
            query_chunk=self.query_chunk,
            bank_chunk=self.bank_chunk,
        )

    # -- checkpoint plumbing --------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._forget_index()
        key = prefix + "bank"
        if key not in state_dict:  # saved with store_bank=False: metadata only
            self.bank = self.bank.new_zeros(0, 0)
            if self.store_bank:
                state_dict[key] = self.bank
        elif not self.store_bank:  # a stored bank is adopted whatever this instance's flag
            self.bank = state_dict.pop(key).detach().clone().to(self.bank.device)
        self._sync_bank_persistence()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


@register_detector
class KNN(BankDetector):
    """KNN: minus the L2 distance from z = h/‖h‖ to its k-th nearest normalised training
    feature (Sun et al. 2022, Sec. 3: -r_k(z*); higher = more ID).

    The search keeps the k largest ``z·b - ‖b‖²/2`` (equivalently the k smallest ‖z - b‖²,
    exact even for all-zero rows) and returns ``-sqrt(max(‖z‖² - 2·top_k, 0))``.

    Hyperparameters are :class:`BankDetector`'s, with the paper's ``k`` (50 for CIFAR-10,
    200 for CIFAR-100, 1000 for ImageNet) and ``bank_fraction`` (1 for CIFAR, 0.01 for
    ImageNet); ``update`` only samples the bank (``bank_fraction``, ``seed``, ``min_bank``),
    the rest enters finalize/score or the checkpoint layout.
    """

    kind: ClassVar[str] = "knn"
    #: OpenOOD v1.5 ``configs/postprocessors/knn.yml``: ``K_list: [50, 100, 200, 500, 1000]``.
    k = replace(BankDetector.k, search=(50, 100, 200, 500, 1000), doc="neighbour rank")

    def bank_rows(self, out: BackboneOutput) -> Tensor:
        return normalize_rows(out.features)

    def kth_distance(self, features: Tensor) -> Tensor:
        """‖z - z_(k)‖₂ for z = h/‖h‖, (B,)."""
        z = normalize_rows(features)
        bank = self._require_bank()
        half_sq = 0.5 * bank.square().sum(dim=1)
        top = self.search(z, offset=half_sq)[:, -1]
        z = z.to(top.dtype)
        return (z.square().sum(dim=1) - 2.0 * top).clamp_min(0.0).sqrt()

    def score(self, out: BackboneOutput, model: OptModel = None, inputs: OptInput = None) -> Tensor:
        return -self.kth_distance(out.features)


__all__ = [
    "BACKENDS",
    "KNN",
    "BankDetector",
    "check_layout",
    "faiss_available",
    "global_positions",
    "mix32",
    "mul32",
    "normalize_rows",
    "seed_key",
    "seeded_uniform",
    "seeded_uniform_at",
    "stream_layout",
    "topk_scores",
]
