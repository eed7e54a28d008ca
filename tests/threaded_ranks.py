"""DDP in one process: ``w`` ranks as threads whose :class:`~lightning_ood.detectors.base.Reducer`
exchange tensors through a barrier, and whose :func:`~lightning_ood.detectors.knn.stream_layout`
reports their own rank.

A unit-test stand-in for a gloo process group (the integration tests run real ones): each
rank fits on its :class:`~lightning_ood.data.samplers.EvalShardedSampler` shard, and the
reductions are the ones ``StrategyReducer`` performs (sums in rank order, concatenations in
rank order), so a detector's world-size dependence shows up without spawning processes.
Importable from every test module (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_ood.detectors import knn, vim
from lightning_ood.detectors.base import Reducer

#: Seconds a rank waits for the others at an exchange before the run is declared hung.
TIMEOUT_S = 60.0


class _Group:
    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT_S)
        self.slots: list[Tensor | None] = [None] * world
        self.local = threading.local()

    def exchange(self, rank: int, t: Tensor) -> list[Tensor]:
        self.slots[rank] = t
        self.barrier.wait()
        got = [s for s in self.slots if s is not None]
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return got


class ThreadReducer(Reducer):
    """Rank ``rank``'s reductions over the threads of a :class:`_Group`."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank = group, rank

    def sum(self, t: Tensor) -> Tensor:
        parts = self.group.exchange(self.rank, t)
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def cat(self, t: Tensor) -> Tensor:
        return torch.cat(self.group.exchange(self.rank, t))


def run_ranks(
    world: int, fn: Callable[[int, Reducer], Any], monkeypatch: pytest.MonkeyPatch
) -> list[Any]:
    """``fn(rank, reducer)`` on ``world`` threads at once (each thread sees its own
    ``stream_layout()``); returns the results by rank, re-raising the first error."""
    group = _Group(world)

    def layout() -> tuple[int, int]:
        return group.local.rank, world

    monkeypatch.setattr(knn, "stream_layout", layout)
    monkeypatch.setattr(vim, "stream_layout", layout)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        group.local.rank = rank
        try:
            results[rank] = fn(rank, ThreadReducer(group, rank))
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    return results


def shard(t: Tensor, rank: int, world: int) -> Tensor:
    """Rank ``rank``'s :class:`~lightning_ood.data.samplers.EvalShardedSampler` rows of ``t``."""
    return t[rank::world]
