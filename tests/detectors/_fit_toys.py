"""Fitting helpers shared by the detector tests on :class:`toys.LinearHeadNet`: the seeded
float64 head, a fit through the engine in batches, and the same fit on two threaded ranks
(DDP's reductions, :mod:`threaded_ranks`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Detector, Reducer

D = TypeVar("D", bound=Detector)


def head_net(n_classes: int, width: int, seed: int = 1) -> LinearHeadNet:
    """Identity features, logits ``W h`` with a seeded Gaussian W (L, q) and no bias."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_classes, width, generator=g, dtype=torch.float64)
    return LinearHeadNet(w, torch.zeros(n_classes, dtype=torch.float64)).eval()


def fit_on(
    det: D,
    net: LinearHeadNet,
    x: Tensor,
    y: Tensor,
    batch: int = 64,
    reducer: Reducer | None = None,
) -> D:
    """``det`` fitted by the engine on (x, y) in batches of ``batch`` rows."""
    outputs = [(net.extract(a), b) for a, b in zip(x.split(batch), y.split(batch), strict=True)]
    engine.fit_detectors([det], net, outputs, reducer)
    return det


def fit_two_ranks(
    make: Callable[[], D],
    net: LinearHeadNet,
    x: Tensor,
    y: Tensor,
    monkeypatch: pytest.MonkeyPatch,
    batch: int = 16,
) -> list[D]:
    """A fresh ``make()`` fitted on each of two ranks' shards (EvalShardedSampler order) at
    once; both should equal the one-process fit."""

    def fit(rank: int, reducer: Reducer) -> D:
        return fit_on(make(), net, shard(x, rank, 2), shard(y, rank, 2), batch, reducer)

    return run_ranks(2, fit, monkeypatch)
