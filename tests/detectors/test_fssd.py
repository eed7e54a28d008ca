"""FSSD: noise conventions, FSS centres, per-layer distances, input pre-processing and the
logistic layer ensemble, each against an independent torch/numpy/sklearn computation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from lightning_ood import engine
from lightning_ood.detectors import Detector, build_detector
from lightning_ood.detectors.fssd import FSSD
from lightning_ood.models.base import BackboneOutput, OODBackbone


class ToyNet(OODBackbone):
    """conv(2->3) - tanh [tap "conv"] - fc(48->5) - tanh [tap "hidden"] - fc(5->4) - tanh -
    fc(4->3). Smooth, so first-order statements about input steps hold for small steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act1 = nn.Tanh()
        self.fc1 = nn.Linear(48, 5)
        self.act2 = nn.Tanh()
        self.fc2 = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)
        self.num_classes, self.num_features = 3, 4
        self.input_shape = (2, 4, 4)
        self.tap_layers = {"conv": "act1", "hidden": "act2"}

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc2(self.act2(self.fc1(self.act1(self.conv(x)).flatten(1)))))

    def get_classifier(self) -> nn.Linear:
        return self.head

    def by_hand(self, x: Tensor) -> dict[str, Tensor]:
        """Every tap computed without hooks: the oracle for ``extract``."""
        conv = torch.tanh(self.conv(x))
        hidden = torch.tanh(self.fc1(conv.flatten(1)))
        feats = torch.tanh(self.fc2(hidden))
        return {"conv": conv, "hidden": hidden, "features": feats, "logits": self.head(feats)}


class ToyTokens(OODBackbone):
    """Embedding(4, 3) - mean over the sequence - fc(3->2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 2)
        self.num_classes, self.num_features = 2, 3
        self.input_shape, self.input_kind, self.vocab_size = (6,), "tokens", 4
        self.tap_layers = {"emb": "emb"}

    def forward_features(self, x: Tensor) -> Tensor:
        return self.emb(x).mean(1)

    def get_classifier(self) -> nn.Linear:
        return self.head


@pytest.fixture
def model() -> ToyNet:
    torch.manual_seed(0)
    return ToyNet().eval()


def _reference_noise(n: int, seed: int, shape: tuple[int, ...]) -> Tensor:
    v = torch.randint(0, 255, (n, *shape), generator=torch.Generator().manual_seed(seed))
    return (v.float() - 127.5) / 255


def _cv_oracle(x: np.ndarray, y: np.ndarray) -> LogisticRegressionCV:
    with warnings.catch_warnings():  # newer sklearn warns about changing defaults
        warnings.simplefilter("ignore", FutureWarning)
        return LogisticRegressionCV(random_state=42, max_iter=1000).fit(x, y)


# -- noise ------------------------------------------------------------------------------------
def test_reference_noise_is_pixel_integers_mapped_without_normalisation(model: ToyNet) -> None:
    noise = FSSD(n_noise=500, noise_seed=3).make_noise(model)
    assert noise.shape == (500, 2, 4, 4) and noise.dtype == torch.float32
    v = noise.double() * 255 + 127.5
    assert torch.allclose(v, v.round(), atol=1e-4)
    ints = v.round().long()
    assert ints.min() == 0 and ints.max() == 254  # randint(0, 255): 255 is never drawn
    assert noise.min() == -0.5 and abs(noise.max().item() - 126.5 / 255) < 1e-7
    assert abs(ints.float().mean().item() - 127.0) < 3.0  # U{0..254} has mean 127
    assert torch.equal(noise, _reference_noise(500, 3, (2, 4, 4)))
    assert not torch.equal(noise, FSSD(n_noise=500, noise_seed=4).make_noise(model))


def test_uniform_noise_is_unit_interval(model: ToyNet) -> None:
    noise = FSSD(noise="uniform", n_noise=500).make_noise(model)
    assert noise.min() >= 0 and noise.max() < 1
    assert noise.min() < 0.01 and noise.max() > 0.99
    assert abs(noise.mean().item() - 0.5) < 0.01
    g = torch.Generator().manual_seed(0)
    assert torch.equal(noise, torch.rand(500, 2, 4, 4, generator=g))


def test_token_models_get_uniform_token_ids() -> None:
    torch.manual_seed(0)
    toks = ToyTokens().eval()
    det = FSSD(n_noise=200)
    noise = det.make_noise(toks)
    assert noise.dtype == torch.long and set(noise.unique().tolist()) == {0, 1, 2, 3}
    engine.fit_detectors([det], toks)
    emb = toks.emb(noise).reshape(200, -1).double().mean(0).float()
    assert det.taps == ("emb", "logits")
    assert torch.allclose(det.centres()[0], emb, atol=1e-6)
    det_eps = FSSD(epsilon=0.1, n_noise=4)
    engine.fit_detectors([det_eps], toks)
    with pytest.raises(ValueError, match="float image inputs"):
        det_eps.score_components(toks.extract(noise[:2], det_eps.taps), toks, noise[:2])


# -- FSS and distances ------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["reference", "uniform"])
def test_fss_is_the_mean_tap_on_the_noise(model: ToyNet, noise: str) -> None:
    det = FSSD(noise=noise, n_noise=37, noise_seed=5, batch_size=10)  # 4 uneven chunks
    assert det.taps == () and not det.is_fitted
    engine.fit_detectors([det], model)
    assert det.is_fitted and det.taps == ("conv", "hidden", "logits")
    if noise == "reference":
        x = _reference_noise(37, 5, (2, 4, 4))
    else:
        x = torch.rand(37, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        taps = model.by_hand(x)
    expected = [taps[t].reshape(37, -1).double().numpy().mean(0) for t in det.taps]
    assert det.fss_sizes.tolist() == [48, 5, 3]
    for got, want in zip(det.centres(), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


class DropToy(ToyNet):
    """ToyNet behind an input dropout, tapped: train mode would change the tap."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.tap_layers = {"drop": "drop"}

    def forward_features(self, x: Tensor) -> Tensor:
        return super().forward_features(self.drop(x))


def test_finalize_uses_eval_mode_and_restores_training_mode() -> None:
    net = DropToy().train()
    det = FSSD(taps=["drop"], n_noise=10)
    det.finalize(net)  # called directly: the test is finalize's own eval/train mode handling
    assert net.training
    want = _reference_noise(10, 0, (2, 4, 4)).flatten(1).mean(0)
    assert torch.allclose(det.centres()[0], want, atol=1e-7)


def test_per_layer_distances_match_numpy(model: ToyNet) -> None:
    det = FSSD(taps=["conv", "hidden", "features", "logits"], n_noise=20)
    engine.fit_detectors([det], model)
    x = torch.randn(6, 2, 4, 4)
    with torch.no_grad():
        comps = det.score_components(model.extract(x, taps=det.taps))
        taps = model.by_hand(x)
    assert comps.shape == (6, 4) and comps.dtype == torch.float32
    for k, (t, c) in enumerate(zip(det.taps, det.centres(), strict=True)):
        want = np.linalg.norm(taps[t].reshape(6, -1).numpy() - c.numpy(), axis=1)
        np.testing.assert_allclose(comps[:, k].numpy(), want, rtol=1e-5)
    # no combiner fitted: the score is the default (last) layer
    assert torch.equal(det.score(model.extract(x, taps=det.taps)), comps[:, -1])
    det0 = FSSD(taps=["conv", "hidden"], n_noise=20, default_layer=0)
    engine.fit_detectors([det0], model)
    with torch.no_grad():
        out = model.extract(x, taps=det0.taps)
    assert torch.equal(det0.score(out), det0.score_components(out)[:, 0])


def test_fitted_on_another_input_size_is_refused(model: ToyNet) -> None:
    det = FSSD(taps=["conv"], n_noise=4)
    engine.fit_detectors([det], model)
    wider = BackboneOutput(torch.randn(2, 4), torch.randn(2, 3), {"conv": torch.randn(2, 4, 4, 4)})
    with pytest.raises(ValueError, match="refit"):
        det.score_components(wider)


def test_unfitted_detector_refuses_to_score(model: ToyNet) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        FSSD(taps=["conv"]).score(model.extract(torch.randn(2, 2, 4, 4), taps=["conv"]))


# -- input pre-processing ---------------------------------------------------------------------
def _oracle_preprocessed(
    model: ToyNet, det: FSSD, x: Tensor, std: Tensor, direction: str, grad_norm: str
) -> np.ndarray:
    """Per tap: autograd on the hand-written network, the documented step, the distance."""
    cols = []
    for t, c in zip(det.taps, det.centres(), strict=True):
        xg = x.clone().requires_grad_(True)
        d = (model.by_hand(xg)[t].flatten(1) - c).norm(dim=1)
        if direction == "paper":
            (g,) = torch.autograd.grad(d.sum(), xg)
            step = g.sign()
        else:
            (g,) = torch.autograd.grad(-d.mean(), xg)  # the reference's loss
            if grad_norm == "batch":
                step = (g - g.mean()) / g.std()
            else:
                flat = g.flatten(1)
                step = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(g)
        xt = x + det.epsilon * step / std.view(1, -1, 1, 1)
        with torch.no_grad():
            cols.append((model.by_hand(xt)[t].flatten(1) - c).norm(dim=1).numpy())
    return np.stack(cols, 1)


@pytest.mark.parametrize(
    ("direction", "grad_norm"),
    [("reference", "batch"), ("reference", "sample"), ("paper", "batch")],
)
def test_preprocessing_matches_autograd_oracle(
    model: ToyNet, direction: str, grad_norm: str
) -> None:
    det = FSSD(n_noise=20, epsilon=0.05, direction=direction, grad_norm=grad_norm,
               input_std=[0.5, 0.25])  # fmt: skip
    assert det.needs_input_grad
    engine.fit_detectors([det], model)
    x = torch.randn(5, 2, 4, 4)
    with torch.no_grad():
        out = model.extract(x, taps=det.taps)
    got = det.score_components(out, model, x)
    want = _oracle_preprocessed(model, det, x, torch.tensor([0.5, 0.25]), direction, grad_norm)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. inputs only
    # the unperturbed distances differ: the perturbation did something
    clean = FSSD(n_noise=20)
    engine.fit_detectors([clean], model)
    assert not np.allclose(clean.score_components(out).numpy(), want, rtol=1e-4)


def test_paper_direction_raises_and_reference_direction_lowers_fssd(model: ToyNet) -> None:
    x = torch.randn(8, 2, 4, 4)
    with torch.no_grad():
        out = model.extract(x, taps=("conv", "hidden", "logits"))
    dets = {
        key: FSSD(n_noise=20, epsilon=0.01, direction=key[0], grad_norm=key[1])
        for key in [("paper", "batch"), ("reference", "sample"), ("reference", "batch")]
    }
    clean_det = FSSD(n_noise=20)
    engine.fit_detectors([*dets.values(), clean_det], model)
    clean = clean_det.score_components(out)
    up = dets["paper", "batch"].score_components(out, model, x)
    assert (up > clean).all()
    # per-sample standardisation lowers every sample's FSSD to first order (Cauchy-Schwarz)
    assert (dets["reference", "sample"].score_components(out, model, x) < clean).all()
    # the reference's batch standardisation lowers it on average
    assert (dets["reference", "batch"].score_components(out, model, x) < clean).float().mean() > 0.8


def test_preprocessing_needs_model_and_inputs(model: ToyNet) -> None:
    det = FSSD(taps=["conv"], n_noise=4, epsilon=0.1)
    engine.fit_detectors([det], model)
    with pytest.raises(ValueError, match="need `model` and `inputs`"):
        det.score_components(model.extract(torch.randn(2, 2, 4, 4), taps=["conv"]))


def test_preprocessing_works_under_inference_mode_inputs(model: ToyNet) -> None:
    det = FSSD(taps=["hidden"], n_noise=4, epsilon=0.02)
    engine.fit_detectors([det], model)
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        out = model.extract(x, taps=det.taps)
        want = det.score_components(out, model, x)
    with torch.inference_mode():
        x_inf = x.clone()
    assert torch.equal(det.score_components(out, model, x_inf), want)


# -- combiner ---------------------------------------------------------------------------------
def _separable(n: int = 60) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    cid = torch.randn(n, 3, generator=g) + torch.tensor([4.0, 1.0, 0.0])
    cood = torch.randn(n, 3, generator=g)
    cid[:, 0] = cid[:, 0].abs() + 3.0  # column 0 separates perfectly: ID > 3 > OOD...
    cood[:, 0] = cood[:, 0].clamp(-2.5, 2.5)
    return cid, cood


@pytest.mark.parametrize("standardize", [False, True])
def test_fit_combiner_matches_sklearn_and_separates(model: ToyNet, standardize: bool) -> None:
    det = FSSD(n_noise=4, standardize=standardize)
    engine.fit_detectors([det], model)
    cid, cood = _separable()
    det.fit_combiner(cid, cood)
    assert bool(det.combiner_fitted)
    x = torch.cat([cid, cood]).double().numpy()
    y = np.r_[np.ones(len(cid)), np.zeros(len(cood))]
    if standardize:
        mean, std = x.mean(0), x.std(0)
        oracle = _cv_oracle((x - mean) / std, y)
        want = oracle.decision_function((x - mean) / std)
    else:
        oracle = _cv_oracle(x, y)
        want = oracle.decision_function(x)
    scores = det.combine(torch.cat([cid, cood]))
    np.testing.assert_allclose(scores.double().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(det.combiner_coef.numpy(), oracle.coef_[0], rtol=1e-10)
    assert roc_auc_score(y, scores.numpy()) == 1.0
    # float64 components (what the callback banks) stay float64
    assert det.combine(torch.cat([cid, cood]).double()).dtype == torch.float64


def test_plain_logistic_combiner_matches_sklearn(model: ToyNet) -> None:
    det = FSSD(n_noise=4, combiner="lr")
    engine.fit_detectors([det], model)
    cid, cood = _separable()
    det.fit_combiner(cid, cood)
    x = torch.cat([cid, cood]).double().numpy()
    y = np.r_[np.ones(len(cid)), np.zeros(len(cood))]
    want = LogisticRegression(max_iter=1000).fit(x, y).decision_function(x)
    np.testing.assert_allclose(det.combine(torch.cat([cid, cood])).numpy(), want, rtol=1e-5)


def test_fit_combiner_checks_shapes(model: ToyNet) -> None:
    det = FSSD(n_noise=4)
    engine.fit_detectors([det], model)  # K = 3
    with pytest.raises(ValueError, match="K=3"):
        det.fit_combiner(torch.randn(10, 2), torch.randn(10, 2))
    with pytest.raises(ValueError, match="NaN"):
        det.fit_combiner(torch.full((10, 3), float("nan")), torch.randn(10, 3))


# -- state, config, validation ----------------------------------------------------------------
def test_state_dict_loads_into_a_fresh_instance_bit_identically(model: ToyNet) -> None:
    det = FSSD(n_noise=30, epsilon=0.01)
    engine.fit_detectors([det], model)
    det.fit_combiner(*_separable())
    x = torch.randn(4, 2, 4, 4)
    with torch.no_grad():
        out = model.extract(x, taps=det.taps)
    fresh = FSSD(n_noise=30, epsilon=0.01)
    assert fresh.taps == ()
    fresh.load_state_dict(det.state_dict())
    assert fresh.taps == det.taps and fresh.is_fitted and bool(fresh.combiner_fitted)
    assert torch.equal(fresh.score(out, model, x), det.score(out, model, x))
    with pytest.raises(ValueError, match="configured with taps"):
        FSSD(taps=["conv"]).load_state_dict(det.state_dict())


def test_config_round_trip_and_registry(model: ToyNet) -> None:
    det = FSSD(taps=None, noise="uniform", epsilon=0.002, direction="paper", name="f")
    engine.fit_detectors([det], model)
    cfg = det.config()
    assert cfg["type"] == "fssd" and cfg["taps"] is None  # the configured value, not resolved
    assert cfg["noise"] == "uniform" and cfg["direction"] == "paper" and cfg["name"] == "f"
    rebuilt = build_detector("f", cfg)
    assert isinstance(rebuilt, FSSD) and isinstance(rebuilt, Detector)
    assert rebuilt.config() == cfg
    assert FSSD(taps=["conv", "logits"]).config()["taps"] == ["conv", "logits"]


def test_needs_input_grad_only_with_epsilon() -> None:
    assert FSSD().needs_input_grad is False
    assert FSSD(epsilon=1e-3).needs_input_grad is True
    assert FSSD.requires_fit and FSSD.has_combiner and not FSSD.uses_training_data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epsilon": -0.1}, "epsilon"),
        ({"n_noise": 0}, "n_noise"),
        ({"n_noise": 2.5}, "n_noise"),
        ({"batch_size": 0}, "batch_size"),
        ({"noise": "gaussian"}, "noise"),
        ({"direction": "up"}, "direction"),
        ({"grad_norm": "layer"}, "grad_norm"),
        ({"combiner": "svm"}, "combiner"),
        ({"input_std": [0.5, 0.0]}, "input_std"),
        ({"taps": "conv"}, "taps"),
        ({"taps": ["conv", "conv"]}, "twice"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FSSD(**kwargs)


# -- real data --------------------------------------------------------------------------------
def _fmnist_test_images(root: Path, n: int) -> Tensor:
    from torchvision.datasets.mnist import read_image_file

    imgs = read_image_file(str(root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"))[:n]
    return ((imgs.float() / 255 - 0.2860) / 0.3530).unsqueeze(1)


def test_lenet_fss_and_distances_on_fashion_mnist(shared_data: Path) -> None:
    from lightning_ood.models import create_model

    torch.manual_seed(0)
    net = create_model("lenet").eval()
    det = FSSD(taps=["conv1", "conv2", "fc1", "logits"], n_noise=100, batch_size=40)
    engine.fit_detectors([det], net)
    assert det.fss_sizes.tolist() == [32 * 26 * 26, 64 * 24 * 24, 128, 10]
    noise = _reference_noise(100, 0, (1, 28, 28))
    x = _fmnist_test_images(shared_data, 64)

    def by_hand(z: Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            c1 = torch.relu(net.conv1(z))
            c2 = torch.relu(net.conv2(c1))
            f1 = torch.relu(net.fc1(torch.max_pool2d(c2, 2).flatten(1)))
            return [t.flatten(1).double().numpy() for t in (c1, c2, f1, net.fc2(f1))]

    fss = [f.mean(0) for f in by_hand(noise)]
    for got, want in zip(det.centres(), fss, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        comps = det.score_components(net.extract(x, taps=det.taps))
    want = np.stack(
        [np.linalg.norm(f - c, axis=1) for f, c in zip(by_hand(x), fss, strict=True)], 1
    )
    np.testing.assert_allclose(comps.numpy(), want, rtol=1e-4)
    # real images sit farther from the noise singularity than noise does (ID far from FSS)
    noise_comps = det.score_components(net.extract(_reference_noise(64, 9, (1, 28, 28)), det.taps))
    assert (comps.mean(0) > noise_comps.mean(0)).all()
