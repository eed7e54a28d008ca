"""Samplers and a resumable DataLoader that make runs independent of the number of ranks.

Both samplers subclass :class:`~torch.utils.data.DistributedSampler`, so Lightning keeps them
instead of injecting its own (which would pad evaluation sets with duplicates):

* :class:`ShardedSampler` (training): one seeded permutation of the whole set per epoch, rank
  ``r`` of ``w`` reads positions ``r, r+w, ...`` of it. The union of the ranks' ``k``-th
  batches is then exactly the single-process ``k``-th batch of ``w`` times the size, so DDP
  with per-rank batch ``b`` sees the same data order as one process with batch ``w*b``.
  It can start mid-epoch (``skip``), which is how a killed run resumes.
* :class:`EvalShardedSampler` (fitting, test, predict): indices ``r, r+w, ...`` with no
  padding, so every sample is seen exactly once over all ranks; gathered results are put back
  in dataset order with :func:`unshard`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ShardedSampler(DistributedSampler):
    """Seeded per-epoch permutation, strided across ranks, resumable mid-epoch.

    Identical to ``DistributedSampler(shuffle=True, drop_last=False)`` (which pads the last
    round with samples from the start of the permutation so every rank gets the same number of
    batches; a training set whose size is not a multiple of ``world_size`` thus repeats a few
    samples per epoch, as every DDP run does), plus :attr:`skip`: the number of this rank's
    samples to leave out at the start of the next iteration of epoch :attr:`skip_epoch`.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0
        self.skip_epoch = -1

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.skip and self.skip_epoch == self.epoch:
            indices = indices[self.skip :]
        self.skip, self.skip_epoch = 0, -1  # one-shot: the next epoch starts at its beginning
        return iter(indices)


class EvalShardedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` reads ``r, r+w, r+2w, ...``: no shuffling, no padding.

    Ranks may get one sample more or less than each other; evaluation loops do not
    synchronise per batch, and :func:`unshard` restores dataset order after a gather.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def unshard(chunks: Sequence[Tensor], total: int | None = None) -> Tensor:
    """Invert :class:`EvalShardedSampler`: ``chunks[r]`` holds rows ``r, r+w, ...`` of a set
    of ``total`` rows (default: all rows); returns them in dataset order.

    Raises:
        ValueError: a chunk's length is not what the sampler gives rank ``r`` (e.g. another
            sampler was used), since the order could then not be restored.
    """
    w = len(chunks)
    n = sum(len(c) for c in chunks) if total is None else total
    for r, c in enumerate(chunks):
        expected = len(range(r, n, w))
        if len(c) != expected:
            raise ValueError(
                f"rank {r} returned {len(c)} rows, but EvalShardedSampler gives it {expected} of "
                f"{n}; the evaluation loaders must use EvalShardedSampler (no padding) so every "
                "sample is counted once"
            )
    if w == 1:
        return chunks[0]
    out = chunks[0].new_empty((n, *chunks[0].shape[1:]))
    for r, c in enumerate(chunks):
        out[r::w] = c
    return out


class ResumableDataLoader(DataLoader):
    """A training DataLoader whose position within the epoch travels in the checkpoint.

    Lightning stores ``state_dict()`` of every stateful training loader in the checkpoint and
    calls ``load_state_dict`` before iterating again, so ``lightning-ood fit --ckpt_path last``
    continues a killed epoch with the batch after the last saved one instead of replaying the
    epoch from its start. Needs a :class:`ShardedSampler` and, to be exact, a sized loader
    (Lightning then does not prefetch, so batches yielded = batches trained on).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ShardedSampler):
            raise TypeError(
                f"ResumableDataLoader needs a ShardedSampler, got {type(self.sampler).__name__}"
            )
        self._yielded = 0
        self._epoch = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: ShardedSampler = self.sampler  # type: ignore[assignment]
        self._epoch = sampler.epoch
        self._yielded = sampler.skip // self.batch_size if sampler.skip_epoch == self._epoch else 0
        # Eager, like DataLoader.__iter__: the base iterator draws its worker seed from the
        # global RNG now (when Lightning calls iter()), not lazily at the first batch, so a
        # resumed run's RNG restore (in on_train_start) lands after that draw, as it did in
        # the uninterrupted run.
        return _CountingIterator(super().__iter__(), self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._yielded, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"the checkpoint stopped mid-epoch with batch_size={state.get('batch_size')}, but "
                f"the training loader now uses batch_size={self.batch_size}; resume with the "
                "same --data.batch_size (and the same number of devices)"
            )
        sampler: ShardedSampler = self.sampler  # type: ignore[assignment]
        per_rank = math.ceil(len(sampler.dataset) / sampler.num_replicas)  # type: ignore[arg-type]
        skip = int(state["batches"]) * self.batch_size  # type: ignore[operator]
        if skip >= per_rank:  # saved after the epoch's last batch: nothing to skip
            return
        sampler.skip, sampler.skip_epoch = skip, int(state["epoch"])
        sampler.set_epoch(int(state["epoch"]))


def rank_and_world(trainer: Any) -> tuple[int, int]:
    """``(global_rank, world_size)`` of an attached trainer, ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


class _CountingIterator:
    """Counts the batches a :class:`ResumableDataLoader` iterator hands out."""

    def __init__(self, inner: Iterator[Any], loader: ResumableDataLoader) -> None:
        self.inner = inner
        self.loader = loader

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._yielded += 1
        return batch

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]
