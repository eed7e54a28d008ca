"""CFOOD (Angiulli et al., SISAP 2025): -CFOF against OpenOOD's ``cfood_postprocessor.py``
re-written in numpy (its κ grid and ranks, per-reference sorted self-distances, the
per-sample count loop), the κ = 1 fallback, the seeded reference fraction, and two threaded
ranks fitting like one process."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from _fit_toys import fit_on, fit_two_ranks, head_net
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.cfood import CFOOD

N, Q, L = 300, 8, 3


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def _data(n: int = N, seed: int = 0, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    # no ReLU: rows with disjoint supports would be exactly orthogonal (distance 2), a tie
    # that OpenOOD's 1e-10 in the normaliser breaks by the rows' norms (see the docs)
    x = torch.randn(n, Q, generator=g, dtype=torch.float64) + 2.0 * torch.eye(L, Q)[y]
    return x + shift, y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    return head_net(L, Q)


def _openood(ref_raw: np.ndarray, test_raw: np.ndarray, k: float) -> np.ndarray:
    """OpenOOD's setup (alpha = 1: every reference row) and postprocess, loops and all."""
    ref = ref_raw / (np.linalg.norm(ref_raw, axis=1, keepdims=True) + 1e-10)
    test = test_raw / (np.linalg.norm(test_raw, axis=1, keepdims=True) + 1e-10)
    n = len(ref)
    kval = np.concatenate(
        (np.linspace(0.001, 0.1, 100), np.linspace(0.105, 0.5, 81), np.linspace(0.51, 0.99, 49))
    )
    kpos = np.array(kval * n - 1, dtype=int)
    keep = np.concatenate(([True], kpos[:-1] < kpos[1:]))
    kval, kpos = kval[keep], kpos[keep]
    knndst = np.stack([np.sort(((ref[i] - ref) ** 2).sum(1))[kpos + 1] for i in range(n)])
    scores = []
    for v in test:
        dst = ((v - ref) ** 2).sum(1)
        count = (knndst >= dst[:, None]).sum(0) / n
        pos = np.nonzero(count >= k)[0]
        scores.append(kval[pos[0]] if len(pos) else 1.0)
    return -np.array(scores)


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.5, 0.999])
def test_cfood_matches_openood_formula_in_numpy(net: LinearHeadNet, rho: float) -> None:
    x, y = _data()
    det = fit_on(CFOOD(bank_fraction=1.0, rho=rho, query_chunk=32, bank_chunk=70), net, x, y)
    g = torch.Generator().manual_seed(9)
    far = torch.randn(30, Q, generator=g, dtype=torch.float64) + 3 * torch.eye(Q)[-1]
    test = torch.cat([_data(60, seed=3)[0], far])
    got = engine.score_batch({"c": det}, net.extract(test))["c"]
    want = _openood(x.numpy(), test.numpy(), rho)
    np.testing.assert_array_equal(got.numpy(), want)
    # ID rows need small neighbourhoods, the far rows large ones; no grid κ reaches 99.9 %
    # of the reference points for the far rows: the fallback κ = 1
    assert float(got[:60].mean()) > float(got[60:].mean())
    if rho == 0.999:
        assert bool((got[60:] == -1.0).any())


def test_reference_fraction_is_seeded_and_scored_on_its_rows(net: LinearHeadNet) -> None:
    x, y = _data()
    det = fit_on(CFOOD(bank_fraction=0.3, seed=2), net, x, y, batch=50)
    again = fit_on(CFOOD(bank_fraction=0.3, seed=2), net, x, y, batch=13)
    assert torch.equal(det.bank, again.bank) and torch.equal(det.knn_dist, again.knn_dist)
    z = x / x.norm(dim=1, keepdim=True)
    kept = [int(torch.nonzero((z - b).abs().sum(dim=1) < 1e-12)[0]) for b in det.bank]
    assert kept == sorted(kept) and 0 < len(kept) < N
    test = _data(40, seed=4)[0]
    got = engine.score_batch({"c": det}, net.extract(test))["c"]
    np.testing.assert_array_equal(got.numpy(), _openood(x[kept].numpy(), test.numpy(), 0.01))


def test_declared_search_space_is_openoods_sweep() -> None:
    assert CFOOD.search_space == {
        "bank_fraction": (0.1, 0.5, 1.0),
        "rho": (0.001, 0.005, 0.01, 0.05),
    }
    assert "k" not in CFOOD.hparams and "rho" in CFOOD.finalize_only


def test_two_ranks_fit_like_one_process(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _data()
    one = fit_on(CFOOD(bank_fraction=0.5, seed=1), net, x, y)

    for det in fit_two_ranks(lambda: CFOOD(bank_fraction=0.5, seed=1), net, x, y, monkeypatch, 16):
        assert torch.equal(det.bank, one.bank) and torch.equal(det.knn_dist, one.knn_dist)


def test_exported_count_path_equals_searchsorted(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under export (no searchsorted in ONNX) the counts come from comparisons: same CFOF."""
    from lightning_ood.detectors import cfood as cfood_module

    x, y = _data()
    det = fit_on(CFOOD(bank_fraction=0.5, rho=0.05), net, x, y)
    out = net.extract(torch.cat([_data(30, seed=6)[0], _data(30, seed=7, shift=1.5)[0]]))
    eager = engine.score_batch({"c": det}, out)["c"]
    monkeypatch.setattr(cfood_module, "exporting", lambda: True)
    assert torch.equal(det.score(out), eager)
