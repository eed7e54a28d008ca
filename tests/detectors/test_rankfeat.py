"""RankFeat (Song et al. 2022): OpenOOD's Block 3 + Block 4 fusion re-implemented in numpy,
pytorch-ood 0.4.0's RankFeat on the last block, power iteration against the SVD, the tap
resolution and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_ood.detector import RankFeat as PodRankFeat
from scipy.special import logsumexp
from torch import Tensor, nn
from toys import TapNet

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS
from lightning_ood.detectors.rankfeat import RankFeat, rank1
from lightning_ood.models.base import OODBackbone


class Blocks(OODBackbone):
    """block3: conv-ReLU (8 x 6 x 6); block4: conv-ReLU (16 x 4 x 4); global pool; fc(16->5)."""

    def __init__(self) -> None:
        super().__init__()
        self.block3 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.block4 = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU())
        self.fc = nn.Linear(16, 5)
        self.num_classes, self.num_features, self.input_shape = 5, 16, (3, 8, 8)
        self.tap_layers = {"block3": "block3", "block4": "block4"}

    def forward_features(self, x: Tensor) -> Tensor:
        return self.block4(self.block3(x)).mean(dim=(2, 3))

    def get_classifier(self) -> nn.Linear:
        return self.fc


@pytest.fixture(scope="module")
def net() -> Blocks:
    torch.manual_seed(0)
    return Blocks().eval()


def _fit(det: RankFeat, net: OODBackbone) -> RankFeat:
    engine.fit_from_loader([det], net, None)
    return det


def _score(det: RankFeat, net: OODBackbone, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        out = net.extract(x, taps=det.tap_names(net))
    return engine.score_batch({"d": det}, out, net, x)["d"].numpy()


def _np_remove(f: np.ndarray) -> np.ndarray:
    """OpenOOD's exact branch: X - s[0] u[:, 0] v[0] per sample, X = (C, HW)."""
    b, c = f.shape[:2]
    m = f.reshape(b, c, -1)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (m - s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :])).reshape(f.shape)


def test_block3_plus_block4_equals_openood_formula(net: Blocks) -> None:
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    det = _fit(RankFeat(taps=["block3", "block4"]), net)
    assert det._pooled == [False, True] and det.needs_inputs and not det.exportable
    w, b = net.fc.weight.detach().double().numpy(), net.fc.bias.detach().double().numpy()
    with torch.no_grad():
        f3 = net.block3(x).double().numpy()
        f4 = net.block4(net.block3(x)).double().numpy()
        f34 = net.block4(torch.from_numpy(_np_remove(f3)).float()).double().numpy()
    logits1 = _np_remove(f4).mean(axis=(2, 3)) @ w.T + b
    logits2 = f34.mean(axis=(2, 3)) @ w.T + b
    want = logsumexp((logits1 + logits2) / 2, axis=1)
    np.testing.assert_allclose(_score(det, net, x), want, rtol=1e-5)


def test_last_block_equals_pytorch_ood(net: Blocks) -> None:
    """Default: the tap that pools to the features (block4), rescored without a rerun."""
    x = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    det = _fit(RankFeat(), net)
    assert det.taps == ("block4",) and not det.needs_inputs and det.exportable
    pod = PodRankFeat(
        backbone=lambda a: net.block4(net.block3(a)), head=lambda f: net.fc(f.mean(dim=(2, 3)))
    )
    with torch.no_grad():
        want = -pod.predict(x).numpy()
        out = net.extract(x, taps=["block4"])
    np.testing.assert_allclose(det.score(out).numpy(), want, rtol=1e-5)


def test_power_iteration_converges_to_the_svd() -> None:
    x = torch.rand(6, 10, 25, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = rank1(x, "svd")
    torch.testing.assert_close(rank1(x, "power", 50), exact, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(rank1(x, "power", 1), exact, rtol=1e-8, atol=1e-10)


def test_tap_resolution_and_refusals() -> None:
    assert DETECTORS["rankfeat"] is RankFeat
    torch.manual_seed(0)
    toy = TapNet().eval()  # conv map (4 x 4 x 4), then fc: no tap pools to the features
    det = _fit(RankFeat(), toy)
    assert det.taps == ("conv",) and det._pooled == [False] and det.needs_inputs
    x = torch.randn(3, 2, 4, 4)
    with pytest.raises(ValueError, match="pass `model` and `inputs`"):
        det.score(toy.extract(x))
    assert _score(det, toy, x).shape == (3,)
    with pytest.raises(ValueError, match=r"taps \['fc'\] are not feature maps"):
        _fit(RankFeat(taps=["fc"]), toy)
    with pytest.raises(ValueError, match=r"has no feature-map tap\(s\) \['layer4'\]"):
        _fit(RankFeat(taps=["layer4"]), toy)
