"""MaxLogit and GEN: hand-computed values, the GEN authors' numpy formula, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, GEN, MaxLogit, build_detector
from lightning_ood.models.base import BackboneOutput


def _out(logits: torch.Tensor) -> BackboneOutput:
    return BackboneOutput(torch.zeros(len(logits), 4), logits)


def test_maxlogit_by_hand() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -5.0, -2.0]])
    assert MaxLogit().score(_out(logits)).tolist() == [3.0, -1.0]


def test_gen_by_hand() -> None:
    two = torch.zeros(1, 2)  # p = (1/2, 1/2)
    assert float(GEN(gamma=0.1).score(_out(two))) == pytest.approx(-2 * 0.5**0.2)
    assert float(GEN(gamma=0.1, M=1).score(_out(two))) == pytest.approx(-(0.5**0.2))
    three = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])  # p = (0.6, 0.3, 0.1)
    want = sum(p**0.5 * (1 - p) ** 0.5 for p in (0.6, 0.3))  # top-2 only
    assert float(GEN(gamma=0.5, M=2).score(_out(three))) == pytest.approx(-want, rel=1e-6)
    confident, uniform = torch.tensor([[9.0, 0.0, 0.0]]), torch.zeros(1, 3)
    assert float(GEN().score(_out(confident))) > float(GEN().score(_out(uniform)))


@pytest.mark.parametrize(("gamma", "m"), [(0.1, 10), (0.1, 100), (0.5, 3), (1.0, 1)])
def test_gen_equals_the_authors_numpy_formula(gamma: float, m: int) -> None:
    """The GEN paper's benchmark: probs sorted ascending, the last M columns,
    sum p^γ (1-p)^γ; the OOD score is that sum (ours is its negation, higher = ID)."""
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = torch.softmax(logits, dim=1).numpy()
    top = np.sort(probs, axis=1)[:, -m:]
    reference = np.sum(top**gamma * (1 - top) ** gamma, axis=1)
    got = GEN(gamma=gamma, M=m).score(_out(logits))
    np.testing.assert_allclose(-got.numpy(), reference, rtol=1e-12)


def test_registered_scored_by_the_engine_and_empty_batches() -> None:
    assert DETECTORS["maxlogit"] is MaxLogit and DETECTORS["gen"] is GEN
    dets = {"maxlogit": build_detector("maxlogit"), "g": build_detector("g", {"type": "gen"})}
    scores = engine.score_batch(dets, _out(torch.randn(5, 7)))
    assert {k: v.shape for k, v in scores.items()} == {"maxlogit": (5,), "g": (5,)}
    empty = engine.score_batch(dets, _out(torch.zeros(0, 7)))
    assert all(v.shape == (0,) for v in empty.values())
    assert dets["g"].config() == {"type": "gen", "gamma": 0.1, "M": 100, "name": "g"}


def test_bad_hyperparameters_are_named() -> None:
    with pytest.raises(ValueError, match=r"gamma=0.0 is out of range; it must lie in \(0.0, 1.0\]"):
        GEN(gamma=0.0)
    with pytest.raises(ValueError, match=r"gamma=1.5 is out of range"):
        GEN(gamma=1.5)
    for m in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"M=.* must be an integer >= 1"):
            GEN(M=m)  # type: ignore[arg-type]
