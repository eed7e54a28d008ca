"""KL matching (Hendrycks et al. 2022): against OpenOOD v1.5's formula written independently
(``scipy.stats.entropy`` to every template, one-hot placeholders for classes nobody is
predicted as), pytorch-ood 0.4.0's ``KLMatching`` fed the same logits, a hand-computed toy,
two threaded ranks against one process, and the checkpoint round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_ood.detector import KLMatching
from scipy.special import softmax
from scipy.stats import entropy
from threaded_ranks import run_ranks, shard
from torch import Tensor
from toys import LinearHeadNet

from lightning_ood import engine
from lightning_ood.detectors.base import Reducer
from lightning_ood.detectors.klm import KLM
from lightning_ood.models.base import BackboneOutput

L = 5


def _logits(n: int, seed: int, scale: float = 2.0) -> Tensor:
    f = torch.randn(n, L, generator=torch.Generator().manual_seed(seed)) * scale
    f[:, 4] -= 50.0  # nobody is predicted as class 4: it has no template
    return f


def _out(f: Tensor) -> BackboneOutput:
    return BackboneOutput(f.new_zeros(f.shape[0], 3), f)


def _fit(f: Tensor, batch: int = 64) -> KLM:
    det = KLM()
    det.reset()
    for chunk in f.split(batch):
        det.update(_out(chunk), torch.zeros(len(chunk), dtype=torch.long))
    det.finalize(LinearHeadNet(torch.zeros(L, 3), torch.zeros(L)))
    return det


def _openood(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """OpenOOD: mean softmax per predicted class (one-hot when none), -min_k entropy(p, d_k)."""
    p, pred = softmax(train, axis=1), train.argmax(1)
    templates = [p[pred == k].mean(0) if (pred == k).any() else np.eye(L)[k] for k in range(L)]
    q = softmax(test, axis=1)
    return -np.array([min(entropy(row, d) for d in templates) for row in q])


def test_klm_matches_openood_and_pytorch_ood() -> None:
    train, test = _logits(300, 0), torch.cat([_logits(40, 1), _logits(40, 2, scale=0.3)])
    det = _fit(train)
    ours = det.score(_out(test))
    assert det.templates.shape == (4, L) and det.template_classes.tolist() == [0, 1, 2, 3]
    ref = _openood(train.double().numpy(), test.double().numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)
    peer = KLMatching(None).fit_logits(train.double())
    torch.testing.assert_close(ours, -peer.predict_logits(test.double()), rtol=1e-10, atol=1e-12)


def test_klm_hand_computed_toy() -> None:
    # two training samples predicted as class 0 with posteriors (0.6, 0.2, 0.2) and
    # (0.8, 0.1, 0.1): d_0 = (0.7, 0.15, 0.15); one predicted as class 1, d_1 = (0.1, 0.8, 0.1)
    rows = torch.tensor(
        [[0.6, 0.2, 0.2], [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64
    ).log()
    det = KLM()
    det.reset()
    det.update(_out(rows), torch.zeros(3, dtype=torch.long))
    det.finalize(LinearHeadNet(torch.zeros(3, 2), torch.zeros(3)))
    test = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    kl0 = 0.5 * math.log(0.5 / 0.7) + 2 * 0.25 * math.log(0.25 / 0.15)
    kl1 = 0.5 * math.log(0.5 / 0.1) + 0.25 * math.log(0.25 / 0.8) + 0.25 * math.log(0.25 / 0.1)
    assert float(det.score(_out(test))) == pytest.approx(-min(kl0, kl1), rel=1e-12)


def test_klm_streamed_threaded_ranks_round_trip_and_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train, test = _logits(200, 3), _logits(30, 4)
    one = _fit(train, batch=200)
    torch.testing.assert_close(_fit(train, batch=7).score(_out(test)), one.score(_out(test)))

    def fit(rank: int, reducer: Reducer) -> KLM:
        det = KLM()
        det.reset()
        det.update(_out(shard(train, rank, 2)), torch.zeros(0))
        det.finalize(LinearHeadNet(torch.zeros(L, 3), torch.zeros(L)), reducer)
        return det

    for det in run_ranks(2, fit, monkeypatch):
        torch.testing.assert_close(det.score(_out(test)), one.score(_out(test)))
    fresh = KLM()
    fresh.load_state_dict(one.state_dict())
    assert "prob_sum" not in one.state_dict()
    torch.testing.assert_close(fresh.score(_out(test)), one.score(_out(test)))
    # through the engine: a net whose head maps 3 features to the logits
    g = torch.Generator().manual_seed(5)
    net = LinearHeadNet(torch.randn(L, 3, generator=g), torch.randn(L, generator=g)).eval()
    x = torch.randn(90, 3, generator=g)
    det = KLM()
    engine.fit_from_loader([det], net, [(x[:45], torch.zeros(45)), (x[45:], torch.zeros(45))])
    with torch.no_grad():
        f = net(x)
    torch.testing.assert_close(det.score(_out(f)), _fit(f).score(_out(f)))
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        det.score(_out(torch.zeros(2, 3)))
