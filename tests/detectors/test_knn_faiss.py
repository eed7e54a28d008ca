"""KNN/NNGuide's faiss backend (issue 23 item 4): what ``backend="auto"`` picks, and the faiss
flat index against the exact torch search on the same bank.

faiss-cpu is in the dev extra, so ``import faiss`` below fails (never skips) where the extra
was not installed.

Tolerances: faiss searches in float32 (``IndexFlatIP``: exact brute force, in BLAS's summation
order); the reference is the same search in float64. On unit-norm features the similarities
``z·b - ‖b‖²/2`` agree within ``SIM_TOL`` = 1e-6 (measured: 8e-8), and the neighbour indices
are identical at every rank: the test first checks that the closest two consecutive exact
similarities (1.3e-6 apart here) are further apart than twice faiss' largest error, so the order
is decided beyond float32 rounding and any differing index is a wrong neighbour, not a tie.
Scores: KNN within 1e-5 (distances near 1), NNGuide within rtol 1e-5 (scores up to 4e2).
"""

from __future__ import annotations

import copy
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor

import faiss
import pytest
import torch
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Detector
from lightning_ood.detectors.knn import KNN, faiss_available, normalize_rows, topk_scores
from lightning_ood.detectors.nnguide import NNGuide

SIM_TOL = 1e-6
N, Q, L, K = 20_000, 64, 10, 10  # bank rows, feature width, classes, neighbours


def _features(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class-clustered features (class means on the first L axes), as a trained net gives."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % L
    return torch.randn(n, Q, generator=g) + 2.0 * torch.eye(L, Q)[y], y


@pytest.fixture(scope="module")
def net() -> LinearHeadNet:
    g = torch.Generator().manual_seed(1)
    return LinearHeadNet(torch.randn(L, Q, generator=g), torch.zeros(L)).eval()


def _fit(det: Detector, net: LinearHeadNet) -> Detector:
    x, y = _features(N, seed=0)
    batches = list(zip(x.split(2048), y.split(2048), strict=True))
    engine.fit_from_loader([det], net, batches)
    return det


def _scores(det: Detector, net: LinearHeadNet, x: Tensor) -> Tensor:
    with torch.no_grad():
        return det.score(net.extract(x))


@pytest.fixture
def faiss_calls(monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """The neighbour indices every faiss flat-index search of the detectors returned."""
    calls: list[Tensor] = []

    class Recording(faiss.IndexFlatIP):
        def search(self, x, k, *args, **kwargs):  # type: ignore[no-untyped-def]
            distances, indices = super().search(x, k, *args, **kwargs)
            calls.append(torch.from_numpy(indices.copy()))
            return distances, indices

    monkeypatch.setattr(faiss, "IndexFlatIP", Recording)
    return calls


def test_auto_picks_faiss_when_it_is_importable(net: LinearHeadNet, faiss_calls: list) -> None:
    assert faiss_available()
    for det in (KNN(), NNGuide(), KNN(backend="faiss")):
        assert det._use_faiss(), type(det).__name__
    assert not KNN(backend="torch")._use_faiss()
    det = _fit(KNN(k=K), net)  # backend="auto", the default
    _scores(det, net, _features(5, seed=1)[0])
    assert len(faiss_calls) == 1 and faiss_calls[0].shape == (5, K)


def test_flat_index_finds_the_exact_neighbours(net: LinearHeadNet, faiss_calls: list) -> None:
    det = _fit(KNN(k=K, backend="faiss"), net)
    x = _features(500, seed=1)[0]
    z = normalize_rows(x)
    half_sq = 0.5 * det.bank.square().sum(dim=1)
    got = det.search(z, offset=half_sq)  # the faiss search, as KNN scoring calls it
    (got_idx,) = faiss_calls
    # the reference: every similarity in float64, the k + 1 best with their indices
    exact = z.double() @ det.bank.double().T - half_sq.double()
    ref, ref_idx = exact.topk(K + 1, dim=1)
    torch.testing.assert_close(got.double(), ref[:, :K], atol=SIM_TOL, rtol=0)
    torch.testing.assert_close(
        got, topk_scores(z, det.bank, K, offset=half_sq), atol=SIM_TOL, rtol=0
    )  # the torch backend's own chunked search
    error = (got.double() - ref[:, :K]).abs().max()
    assert ref.diff(dim=1).abs().min() > 2 * error  # no tie within float32 rounding ...
    assert torch.equal(got_idx, ref_idx[:, :K])  # ... so the very same neighbours, in order


@pytest.mark.parametrize("cls", [KNN, NNGuide])
def test_faiss_and_torch_backends_score_alike(net: LinearHeadNet, cls: type) -> None:
    """One fitted bank, scored by each backend (``backend`` is a finalize-only setting)."""
    det = _fit(cls(k=K, backend="faiss"), net)
    x = torch.cat([_features(300, seed=2)[0], _features(300, seed=3)[0] * 3.0])  # ID, far
    faiss_scores = _scores(det, net, x)
    det.backend = "torch"
    torch_scores = _scores(det, net, x)
    # KNN: -sqrt(‖z‖² - 2·top), distances 0.3 to 1.1 here; NNGuide: energy x mean similarity
    torch.testing.assert_close(faiss_scores, torch_scores, atol=1e-5, rtol=1e-5)


def test_without_faiss_auto_uses_torch_and_faiss_is_refused_by_name(
    net: LinearHeadNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not faiss_available()
    with pytest.raises(ImportError, match=r"backend='faiss' needs the faiss package.*faiss-cpu"):
        KNN(backend="faiss")
    with pytest.raises(ImportError, match="backend='faiss'"):
        NNGuide(backend="faiss")
    det = _fit(KNN(k=K), net)
    assert not det._use_faiss()  # auto falls back to the exact torch search
    x = _features(50, seed=1)[0]
    with torch.no_grad():
        want = topk_scores(normalize_rows(x), det.bank, K, offset=0.5 * det.bank.square().sum(1))
    assert torch.equal(det.search(normalize_rows(x), 0.5 * det.bank.square().sum(1)), want)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The width of every faiss flat index the detectors build."""
    widths: list[int] = []

    class Counting(faiss.IndexFlatIP):
        def __init__(self, d: int) -> None:
            super().__init__(d)
            widths.append(d)

    monkeypatch.setattr(faiss, "IndexFlatIP", Counting)
    return widths


@pytest.mark.parametrize("cls", [KNN, NNGuide])
def test_the_index_is_built_once_per_bank(net: LinearHeadNet, built: list[int], cls: type) -> None:
    """Batches after the first reuse the bank's index; a refit or a load builds a new one, and
    every score equals the exact torch search's on the bank of the moment."""
    det = _fit(cls(k=K, backend="faiss"), net)
    ref = _fit(cls(k=K, backend="torch"), net)
    batches = [_features(40, seed=s)[0] for s in (5, 6, 7)]
    for x in batches:
        torch.testing.assert_close(_scores(det, net, x), _scores(ref, net, x), atol=1e-5, rtol=1e-5)
    assert len(built) == 1
    # refit on other training features: a new bank, a new index
    g = torch.Generator().manual_seed(9)
    x_new = torch.randn(4000, Q, generator=g) * 2.0
    for d in (det, ref):
        d.mark_unfitted()
        engine.fit_from_loader([d], net, [(x_new, torch.arange(4000) % L)])
    x = batches[0]
    torch.testing.assert_close(_scores(det, net, x), _scores(ref, net, x), atol=1e-5, rtol=1e-5)
    assert len(built) == 2
    # a load swaps the bank in place of the fitted one: rebuilt again
    stored = _fit(cls(k=K, backend="torch", store_bank=True), net)
    det.load_state_dict(stored.state_dict())
    want = _scores(stored, net, x)
    torch.testing.assert_close(_scores(det, net, x), want, atol=1e-5, rtol=1e-5)
    assert len(built) == 3
    # copies carry no index (a faiss index cannot be pickled): each builds its own
    for twin in (copy.deepcopy(det), pickle.loads(pickle.dumps(det))):
        torch.testing.assert_close(_scores(twin, net, x), want, atol=1e-5, rtol=1e-5)
    assert len(built) == 5


def test_a_replaced_bank_or_threads_never_reuse_a_wrong_index(
    net: LinearHeadNet, built: list[int]
) -> None:
    """A bank tensor swapped in without a fit (even at a freed tensor's address) builds its own
    index; eight threads scoring at once build one."""
    det = _fit(KNN(k=K, backend="faiss"), net)
    x = _features(40, seed=5)[0]
    first = _scores(det, net, x)
    det.bank = -det.bank  # a new tensor of the same shape, version 0, maybe the same address
    flipped = _scores(det, net, x)
    assert len(built) == 2 and not torch.allclose(first, flipped)
    det.backend = "torch"
    torch.testing.assert_close(flipped, _scores(det, net, x), atol=1e-5, rtol=1e-5)
    det.backend = "faiss"
    det.bank.mul_(1.0)  # in place: a new version
    _scores(det, net, x)
    assert len(built) == 3
    det._forget_index()
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: _scores(det, net, x), range(8)))
    assert len(built) == 4
    for out in outs:
        torch.testing.assert_close(out, flipped, atol=1e-5, rtol=1e-5)
