"""Relation (Kim et al., NeurIPS 2023): the score against the authors' / OpenOOD's
``get_relation`` formula re-written in numpy (normalised features, clamped cosine times the
probability inner product, edges above 0.03, summed powers), the seeded bank fraction, the
chunking, the declared hyperparameters, and two threaded ranks fitting like one process."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _fit_toys import fit_on, fit_two_ranks, head_net
from scipy.special import softmax
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.relation import Relation

N, Q, L = 200, 8, 3


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    x = torch.relu(torch.randn(n, Q, generator=g, dtype=torch.float64) + 2.0 * torch.eye(L, Q)[y])
    return x + shift, y


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    return head_net(L, Q)


def _reference(
    feat_train: np.ndarray, logit_train: np.ndarray, feat: np.ndarray, logit: np.ndarray, pw: float
) -> np.ndarray:
    """OpenOOD's setup + postprocess: normalize (sqrt(sum sq + 1e-10)), softmax, kernel
    clamp(dot, 0) * (p p_tᵀ), mask |rel| > 0.03, sum sign(rel)|rel|^pow."""

    def norm(f: np.ndarray) -> np.ndarray:
        return f / np.sqrt((f**2).sum(-1) + 1e-10)[:, None]

    rel = np.clip(norm(feat) @ norm(feat_train).T, 0.0, None)
    rel = rel * (softmax(logit, axis=1) @ softmax(logit_train, axis=1).T)
    rel = rel * (np.abs(rel) > 0.03)
    return (np.sign(rel) * np.abs(rel) ** pw).sum(-1)


@pytest.mark.parametrize("pw", [1.0, 4.0])
def test_relation_matches_openood_formula_in_numpy(net: LinearHeadNet, pw: float) -> None:
    x, y = _data()
    det = fit_on(Relation(pow=pw, query_chunk=16, bank_chunk=64), net, x, y)  # many chunks
    test = torch.cat([_data(40, seed=3)[0], _data(40, seed=4, shift=1.0)[0]])
    out, out_train = net.extract(test), net.extract(x)
    got = engine.score_batch({"r": det}, out)["r"]
    want = _reference(
        out_train.features.numpy(), out_train.logits.numpy(), test.numpy(), out.logits.numpy(), pw
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    assert det.bank.shape == (N, Q + L)


def test_bank_fraction_is_a_seeded_subset_scored_alike(net: LinearHeadNet) -> None:
    """With bank_fraction < 1 the score is the same formula over the sampled rows only."""
    x, y = _data()
    det = fit_on(Relation(bank_fraction=0.4, seed=3), net, x, y, batch=50)
    again = fit_on(Relation(bank_fraction=0.4, seed=3), net, x, y, batch=17)
    assert torch.equal(det.bank, again.bank) and 0 < det.bank.shape[0] < N
    out_train = net.extract(x)
    z = out_train.features / out_train.features.norm(dim=1, keepdim=True)
    rows = torch.cat([z, out_train.logits.softmax(dim=1)], dim=1)
    kept = [int(torch.nonzero((rows - b).abs().sum(dim=1) < 1e-12)[0]) for b in det.bank]
    assert kept == sorted(kept)  # in training-set order
    test = _data(30, seed=5)[0]
    out = net.extract(test)
    want = _reference(
        out_train.features[kept].numpy(), out_train.logits[kept].numpy(), test.numpy(),
        out.logits.numpy(), 1.0,
    )  # fmt: skip
    np.testing.assert_allclose(engine.score_batch({"r": det}, out)["r"].numpy(), want, rtol=1e-9)


def test_declared_hyperparameters_and_ood_ranking(net: LinearHeadNet) -> None:
    assert Relation.search_space == {"pow": (1.0, 2.0, 4.0, 6.0, 8.0)}
    assert "k" not in Relation.hparams and "backend" not in Relation.hparams
    assert {"pow", "edge_threshold"} <= Relation.finalize_only
    x, y = _data()
    det = fit_on(Relation(), net, x, y)
    s_id = engine.score_batch({"r": det}, net.extract(_data(100, seed=3)[0]))["r"]
    g = torch.Generator().manual_seed(4)  # activations on a direction no class uses
    far = torch.relu(torch.randn(100, Q, generator=g, dtype=torch.float64)) + 3.0 * torch.eye(Q)[-1]
    s_ood = engine.score_batch({"r": det}, net.extract(far))["r"]
    assert float((s_id[:, None] > s_ood[None, :]).double().mean()) > 0.9


def test_two_ranks_fit_like_one_process(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data()
    one = fit_on(Relation(bank_fraction=0.5, seed=1), net, x, y)

    for det in fit_two_ranks(
        lambda: Relation(bank_fraction=0.5, seed=1), net, x, y, monkeypatch, 16
    ):
        assert torch.equal(det.bank, one.bank)
