"""Samplers: DDP shards = the single-process order, nothing padded at evaluation, resumable."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_ood.data.samplers import (
    EvalShardedSampler,
    ResumableDataLoader,
    ShardedSampler,
    unshard,
)


def _ds(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_reassemble_the_single_process_batches(world: int) -> None:
    ds, b = _ds(24), 4
    single = ShardedSampler(ds, num_replicas=1, rank=0, seed=7)
    single.set_epoch(3)
    order = list(single)
    shards = []
    for r in range(world):
        s = ShardedSampler(ds, num_replicas=world, rank=r, seed=7)
        s.set_epoch(3)
        shards.append(list(s))
    # global batch k of size world*b = union of every rank's k-th batch of size b
    for k in range(len(order) // (world * b)):
        union = sorted(i for sh in shards for i in sh[k * b : (k + 1) * b])
        assert union == sorted(order[k * world * b : (k + 1) * world * b])
    other = ShardedSampler(ds, num_replicas=1, rank=0, seed=7)
    other.set_epoch(4)
    assert list(other) != order  # a new permutation per epoch


@pytest.mark.parametrize(("n", "world"), [(10, 3), (7, 2), (5, 1), (2, 4)])
def test_eval_shards_cover_each_sample_once_and_unshard_restores_order(n: int, world: int) -> None:
    ds = _ds(n)
    shards = [list(EvalShardedSampler(ds, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for sh in shards for i in sh) == list(range(n))  # no padding, no gaps
    assert [len(EvalShardedSampler(ds, world, r)) for r in range(world)] == [len(s) for s in shards]
    values = torch.arange(n, dtype=torch.float64) * 10
    chunks = [values[torch.tensor(sh, dtype=torch.long)] for sh in shards]
    assert torch.equal(unshard(chunks), values)


def test_unshard_refuses_padded_chunks() -> None:
    # DistributedSampler's padding would give rank 1 a duplicate: 3 + 3 rows for 5 samples
    with pytest.raises(ValueError, match=r"rank 1 returned 3 rows.*EvalShardedSampler gives it 2"):
        unshard([torch.zeros(3), torch.zeros(3)], total=5)


def test_resumable_loader_continues_mid_epoch() -> None:
    ds = _ds(20)
    full = ResumableDataLoader(ds, batch_size=3, sampler=ShardedSampler(ds, seed=1))
    full.sampler.set_epoch(2)
    reference = [b[0].tolist() for b in full]

    run = ResumableDataLoader(ds, batch_size=3, sampler=ShardedSampler(ds, seed=1))
    run.sampler.set_epoch(2)
    it = iter(run)
    seen = [next(it)[0].tolist() for _ in range(4)]
    state = run.state_dict()
    assert state == {"epoch": 2, "batches": 4, "batch_size": 3}

    resumed = ResumableDataLoader(ds, batch_size=3, sampler=ShardedSampler(ds, seed=1))
    resumed.load_state_dict(state)
    rest = [b[0].tolist() for b in resumed]
    assert seen + rest == reference
    assert resumed.state_dict()["batches"] == len(reference)  # counts the skipped batches too
    resumed.sampler.set_epoch(3)  # the next epoch starts from its beginning
    assert len([b for b in resumed]) == len(reference)


def test_resume_with_another_batch_size_is_refused() -> None:
    ds = _ds(20)
    loader = ResumableDataLoader(ds, batch_size=4, sampler=ShardedSampler(ds))
    with pytest.raises(ValueError, match=r"batch_size=3.*now uses batch_size=4"):
        loader.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 3})


def test_state_saved_at_epoch_end_skips_nothing() -> None:
    ds = _ds(9)
    loader = ResumableDataLoader(ds, batch_size=3, sampler=ShardedSampler(ds))
    loader.load_state_dict({"epoch": 0, "batches": 3, "batch_size": 3})
    assert sum(len(b[0]) for b in loader) == 9
