"""The one engine: one forward per batch for every detector, fitting from a loader equals
fitting from cached features bit for bit, the input-gradient dispatch, calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from toys import TapNet

from lightning_ood import engine
from lightning_ood.detectors import Detector, build_detector
from lightning_ood.features import compute_features, fit_from_cache, score_cached

#: Every kind that reads the training set, plus the data-free ones, on the toy's taps.
SPECS: dict[str, dict] = {
    "msp": {},
    "energy": {},
    "odin0": {"type": "odin", "epsilon": 0.0},
    "react": {"percentile": 80.0},
    "dice": {"p": 50.0},
    "dice_react": {"p": 50.0, "percentile": 80.0},
    "line": {"p_a": 50, "p_w": 50, "delta": 1.0},
    "mahalanobis": {"taps": ["conv", "features"]},
    "fssd": {"taps": ["conv", "logits"], "n_noise": 8},
}


class CountingNet(TapNet):
    """The toy TapNet (taps "conv", "fc"), counting its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward_features(self, x: Tensor) -> Tensor:
        self.forwards += 1
        return super().forward_features(x)


@pytest.fixture
def net() -> CountingNet:
    torch.manual_seed(3)
    return CountingNet().eval()


def _loader(n: int, seed: int, batch_size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 4, 4, generator=g)
    y = torch.arange(n) % 3  # every class present
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _build() -> dict[str, Detector]:
    return {n: build_detector(n, s) for n, s in SPECS.items()}


def test_one_forward_per_batch_serves_every_detector(net: CountingNet) -> None:
    loader = _loader(200, 0)  # 7 batches
    dets = _build()
    fit_from_loader_no_fssd = {n: d for n, d in dets.items() if n != "fssd"}
    engine.fit_from_loader(fit_from_loader_no_fssd.values(), net, loader)
    assert net.forwards == len(loader) == 7  # one pass for five fitting detectors
    engine.fit_detectors([dets["fssd"]], net)  # FSSD reads no training data: its noise pass
    assert net.forwards == 7 + math.ceil(8 / dets["fssd"].batch_size)
    net.forwards = 0
    scores = engine.score_loader(dets, net, _loader(100, 1))
    assert net.forwards == 4  # 100 samples / 32: four batches, one forward each
    assert set(scores) == set(SPECS)
    assert all(s.shape == (100,) and s.dtype == torch.float64 for s in scores.values())


def test_fitting_from_a_loader_equals_fitting_from_cached_features(net: CountingNet) -> None:
    loader = _loader(200, 0)
    live, cached = _build(), _build()
    engine.fit_from_loader(live.values(), net, loader)
    features = compute_features(net, loader, taps=engine.detector_taps(cached.values(), net))
    fit_from_cache(cached.values(), net, features, batch_size=64)  # other chunking, same sums
    for name in SPECS:
        a, b = live[name].state_dict(), cached[name].state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            if isinstance(a[key], Tensor):
                assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7, equal_nan=True), key
    test = _loader(100, 1)
    s_live = engine.score_loader(live, net, test)
    s_cached = score_cached(cached, compute_features(net, test, ["conv"]))
    for name in SPECS:
        torch.testing.assert_close(s_cached[name], s_live[name], rtol=1e-5, atol=1e-6)


def test_fit_detectors_equals_the_detector_protocol_by_hand(net: CountingNet) -> None:
    """The reference for every engine-based oracle in the suite: reset, update per batch
    under no_grad, finalize, written out by hand (the one place tests do so on purpose)."""
    loader = _loader(200, 0)
    by_engine = _build()
    engine.fit_from_loader(by_engine.values(), net, loader)
    by_hand = _build()
    taps = engine.detector_taps(by_hand.values(), net)
    for det in by_hand.values():
        det.reset()
    with torch.no_grad():
        for x, y in loader:
            out = net.extract(x, taps)
            for det in by_hand.values():
                if det.requires_fit and det.uses_training_data:
                    det.update(out, y, net)
    for det in by_hand.values():
        det.finalize(net)
    x = torch.randn(20, 2, 4, 4)
    with torch.no_grad():
        out = net.extract(x, taps)
    want = {n: d.score(out, net, x) for n, d in by_hand.items()}
    got = engine.score_batch(by_engine, out, net, x)
    for name in SPECS:
        assert torch.equal(got[name], want[name]), name


def test_same_chunking_is_bit_identical(net: CountingNet) -> None:
    """Cached features chunked like the loader give exactly the eval pass's state."""
    loader = _loader(200, 0)
    live = {"line": build_detector("line"), "dice": build_detector("dice")}
    cached = {"line": build_detector("line"), "dice": build_detector("dice")}
    engine.fit_from_loader(live.values(), net, loader)
    fit_from_cache(cached.values(), net, compute_features(net, loader), batch_size=32)
    for name in live:
        for key, value in live[name].state_dict().items():
            other = cached[name].state_dict()[key]
            assert torch.equal(value, other) or (value.isnan().all() and other.isnan().all()), key


def test_score_batch_input_gradient_dispatch(net: CountingNet) -> None:
    x = torch.randn(5, 2, 4, 4)
    odin = {"odin": build_detector("odin", {"epsilon": 0.01, "temperature": 10.0})}
    with torch.no_grad():
        out = net.extract(x)
    with pytest.raises(ValueError, match=r"'odin'.*needs input gradients.*epsilon: 0"):
        engine.score_batch(odin, out)  # features only: refused with its name
    s = engine.score_batch(odin, out, net, x)["odin"]
    # The hand-computed ODIN score: x' = x - eps * sign(grad of -log softmax_yhat(f(x)/T)).
    xg = x.clone().requires_grad_(True)
    logits = net(xg) / 10.0
    loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    x2 = x - 0.01 * torch.where(grad >= 0, 1.0, -1.0)
    want = (net(x2).detach() / 10.0).softmax(1).amax(1)
    torch.testing.assert_close(s, want)


def test_components_for_layer_ensembles_only(net: CountingNet) -> None:
    loader = _loader(200, 0)
    dets = {n: build_detector(n, SPECS[n]) for n in ("energy", "mahalanobis")}
    engine.fit_from_loader(dets.values(), net, loader)
    x = torch.randn(6, 2, 4, 4)
    with torch.no_grad():
        out = net.extract(x, engine.detector_taps(dets.values(), net))
    comp = engine.score_batch(dets, out, net, x, components=True)
    plain = engine.score_batch(dets, out, net, x)
    assert comp["mahalanobis"].shape == (6, 2) and comp["energy"].shape == (6,)
    torch.testing.assert_close(
        dets["mahalanobis"].combine(comp["mahalanobis"]), plain["mahalanobis"]
    )


def test_fit_refuses_missing_training_outputs(net: CountingNet) -> None:
    with pytest.raises(ValueError, match=r"\['line'\] are fitted on the training set"):
        engine.fit_detectors([build_detector("line"), build_detector("msp")], net, None)
    unlabelled = DataLoader(TensorDataset(torch.randn(8, 2, 4, 4)), batch_size=4)
    with pytest.raises(ValueError, match="inputs only"):
        engine.fit_from_loader([build_detector("line")], net, unlabelled)


def test_eval_pass_restores_training_mode_and_builds_no_graph(net: CountingNet) -> None:
    net.train()
    sizes = []
    for x, y, out in engine.eval_pass(net, _loader(40, 0), ["conv"]):
        assert not net.training and not out.features.requires_grad
        assert out.taps["conv"].shape == (len(x), 4, 4, 4) and y is not None
        sizes.append(len(x))
    assert sizes == [32, 8] and net.training


def test_calibration_and_decisions() -> None:
    det = build_detector("msp")
    scores = torch.arange(100, dtype=torch.float64)  # 0..99
    thresholds = engine.calibrate_detectors({"msp": det}, {"msp": scores}, tpr=0.95)
    # floor((1 - 0.95) * 100) = 5: the 6th smallest score; exactly 95 of 100 are >= it.
    assert thresholds == {"msp": 5.0} and float(det.threshold) == 5.0
    assert int((scores >= det.threshold).sum()) == 95
    flags = engine.decide({"msp": det}, {"msp": torch.tensor([4.0, 5.0, 6.0])})["msp"]
    assert flags.tolist() == [True, False, False]
    with pytest.raises(ValueError, match=r"no held-out ID scores for detectors \['msp'\]"):
        engine.calibrate_detectors({"msp": det}, {})
