"""The exact streaming percentile behind ReAct's clip: radix selection against numpy."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_ood.detectors.base import Reducer, percentile
from lightning_ood.detectors.quantile import StreamingPercentile


def run(chunks: list[Tensor], p: float, max_values: int) -> StreamingPercentile:
    sp = StreamingPercentile(p, max_values)
    again = True
    while again:
        for c in chunks:
            sp.add(c)
        again = sp.end_pass()
    return sp


DATA = {
    "normal": lambda dt: torch.randn(3001, dtype=dt),
    "relu": lambda dt: torch.relu(torch.randn(701, 5, dtype=dt)),  # many exact zeros
    "tiny_negative": lambda dt: -torch.rand(999, dtype=dt) * 1e-30,
    "ties": lambda dt: torch.randint(0, 4, (1000,)).to(dt),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("p", [0.0, 0.1, 50.0, 90.0, 99.9, 100.0])
def test_radix_selection_equals_numpy_and_the_sort(dtype: torch.dtype, kind: str, p: float) -> None:
    torch.manual_seed(0)
    data = DATA[kind](dtype)
    chunks = list(data.flatten().split(257))
    kept = run(chunks, p, max_values=10**9)
    radix = run(chunks, p, max_values=100)
    assert kept.passes == 1
    assert radix.passes == (2 if dtype == torch.float32 else 4)  # 16 bits per pass
    want = float(percentile(data.flatten(), p))
    assert float(kept.value) == want and float(radix.value) == want  # bit-identical
    assert want == pytest.approx(np.percentile(data.numpy(), p), rel=1e-6, abs=1e-45)


class ThreadRank(Reducer):
    """One of two ranks run as threads: ``sum``/``cat`` exchange tensors at a barrier, as an
    all-reduce would, so each rank decides from the global counts."""

    def __init__(self, rank: int, slots: list, barrier: threading.Barrier) -> None:
        self.rank, self.slots, self.barrier = rank, slots, barrier

    def _exchange(self, t: Tensor) -> list[Tensor]:
        self.slots[self.rank] = t
        self.barrier.wait()
        both = list(self.slots)
        self.barrier.wait()
        return both

    def sum(self, t: Tensor) -> Tensor:
        a, b = self._exchange(t)
        return a + b

    def cat(self, t: Tensor) -> Tensor:
        return torch.cat(self._exchange(t))


@pytest.mark.parametrize("max_values", [100, 10**9])
def test_two_ranks_find_the_single_process_value(max_values: int) -> None:
    torch.manual_seed(1)
    data = torch.rand(1500) * 4 - 1
    shards = (data[:800], data[800:])
    slots: list = [None, None]
    barrier = threading.Barrier(2, timeout=30)
    found: dict[int, StreamingPercentile] = {}

    def rank(r: int) -> None:
        sp, reducer = StreamingPercentile(90.0, max_values), ThreadRank(r, slots, barrier)
        again = True
        while again:
            sp.add(shards[r])
            again = sp.end_pass(reducer)
        found[r] = sp

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = float(percentile(data, 90.0))
    assert float(found[0].value) == float(found[1].value) == want
    assert found[0].passes == (1 if max_values > 1500 else 2)


def test_non_finite_values_are_refused() -> None:
    sp = StreamingPercentile(90.0, 10)
    with pytest.raises(ValueError, match="1 of 3 values are NaN/inf"):
        sp.add(torch.tensor([1.0, float("nan"), 2.0]))
