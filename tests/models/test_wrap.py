"""``wrap(net, head=...)`` on a user's own network, and detectors on zoo/wrapped models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ood import engine
from lightning_ood.detectors import build_detectors
from lightning_ood.models import NonLinearHeadError, create_model, linear_classifier, wrap


class TinyNet(nn.Module):
    """A user's classifier: conv body, pooling, then a head made of several layers."""

    def __init__(self, mlp_head: bool = False, num_classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = (
            nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, num_classes))
            if mlp_head
            else nn.Linear(5, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(torch.relu(self.body(x))).flatten(1))


def test_wrap_linear_head_contract() -> None:
    net = TinyNet().eval()
    model = wrap(net, head="fc", input_shape=(3, 8, 8)).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        out = model.extract(x, ["body.0", "body"])
        hand = net.pool(torch.relu(net.body(x))).flatten(1)
        reference = net(x)
    assert (model.num_features, model.num_classes) == (5, 4)
    torch.testing.assert_close(out.features, hand, rtol=0, atol=0)
    assert (out.logits - reference).abs().max() <= 1e-6
    assert (model.get_classifier()(out.features) - reference).abs().max() <= 1e-6
    assert model.get_classifier() is net.fc
    assert out.taps["body.0"].shape == (3, 6, 8, 8) and out.taps["body"].shape == (3, 5, 6, 6)
    assert wrap(net, head=None).head_name == "fc"  # the last nn.Linear


def test_wrap_mlp_head_serves_feature_detectors_and_refuses_linear_ones() -> None:
    net = TinyNet(mlp_head=True).eval()
    model = wrap(net, head="fc", input_shape=(3, 8, 8)).eval()
    assert (model.num_features, model.num_classes) == (5, 4)  # measured by one forward
    x = torch.rand(4, 3, 8, 8)
    dets = build_detectors({"energy": {}, "msp": {}})
    with torch.no_grad():
        out = model.extract(x)
        reference = net(x)
        engine.fit_detectors(dets.values(), model, [(out, torch.tensor([0, 1, 2, 3]))])
        energy = dets["energy"].score(out)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)
    torch.testing.assert_close(energy, torch.logsumexp(reference, dim=1))
    with pytest.raises(NonLinearHeadError, match=r"head 'fc' of TinyNet is a Sequential"):
        model.get_classifier()
    with pytest.raises(NonLinearHeadError, match=r"^detector ReAct needs a linear classifier head"):
        linear_classifier(model, "ReAct")


def test_linear_head_detector_names_itself_and_the_head() -> None:
    """ReAct copies W and b at finalize: on an MLP head it must say who needs what."""
    net = TinyNet(mlp_head=True).eval()
    model = wrap(net, head="fc", input_shape=(3, 8, 8)).eval()
    react = build_detectors({"react": {"percentile": 90.0}})["react"]
    with torch.no_grad():
        out = model.extract(torch.rand(4, 3, 8, 8))
    with pytest.raises(NonLinearHeadError) as info:
        engine.fit_detectors([react], model, [(out, torch.tensor([0, 1, 2, 3]))])
    msg = str(info.value)
    assert msg.startswith("detector ReAct needs a linear classifier head")
    assert "'fc' of TinyNet is a Sequential" in msg


def test_wrap_bad_heads_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no module of that name; close matches: \['fc'\]"):
        wrap(TinyNet(), head="fcc")
    with pytest.raises(RuntimeError, match=r"output of head 'body.2' is not the network's output"):
        wrap(TinyNet(), head="body.2", input_shape=(3, 8, 8))  # not the last layer
    with pytest.raises(ValueError, match="pass input_shape="):
        wrap(TinyNet(mlp_head=True), head="fc")


def test_wrap_from_config_by_import_path() -> None:
    model = create_model(
        "wrap", module="torchvision.models.MobileNetV2", num_classes=6, input_shape=[3, 32, 32]
    )
    assert model.head_name == "classifier.1" and model.num_classes == 6
    assert model.num_features == 1280 and model.input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"has 1000 outputs but num_classes=6"):
        create_model("wrap", module="torchvision.models.resnet18", num_classes=6)
    with pytest.raises(ValueError, match=r"cannot import module='no_such_pkg\.Net'"):
        create_model("wrap", module="no_such_pkg.Net", num_classes=6)


def test_wrap_pickled_module_needs_opt_in(tmp_path: Path) -> None:
    from torchvision.models import MobileNetV2

    net = MobileNetV2(num_classes=3).eval()
    path = tmp_path / "mine.pt"
    torch.save(net, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        create_model("wrap", module=str(path), num_classes=3)
    model = create_model(
        "wrap", module=str(path), num_classes=3, trust_pickle=True, input_shape=[3, 32, 32]
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)


def test_line_energy_mahalanobis_on_a_random_tv_resnet18() -> None:
    torch.manual_seed(0)
    model = create_model("tv:resnet18", num_classes=3, image_size=32).eval()
    x, y = torch.rand(60, 3, 32, 32), torch.arange(60) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    dets = build_detectors(
        {
            "energy": {},
            "line": {"delta": 10.0, "p_a": 10, "p_w": 10},
            "mahalanobis": {"taps": ["fc"]},  # a hooked tap: the head module's output
        }
    )
    engine.fit_from_loader(dets.values(), model, loader)
    test = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        out = model.extract(test, ["fc"])
        train = model.extract(x, ["fc"])
    scores = {n: d.score(out, model, test) for n, d in dets.items()}
    torch.testing.assert_close(scores["energy"], torch.logsumexp(out.logits, dim=1))
    # LINe's contribution matrix, closed form: C[:, k] = W[k] * mean of h over class k.
    w = model.get_classifier().weight
    means = torch.stack([train.features[y == k].mean(0) for k in range(3)])
    contribution = dets["line"].contribution_matrix
    torch.testing.assert_close(contribution, (w * means).T, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(scores["line"]).all() and scores["line"].shape == (5,)
    # Mahalanobis on the fc tap (3-d, well conditioned): -min_k (f - mu_k)^T Sigma^-1 (f - mu_k).
    torch.testing.assert_close(train.taps["fc"], train.logits, rtol=0, atol=0)
    f = train.taps["fc"].double()
    mu = torch.stack([f[y == k].mean(0) for k in range(3)])
    centred = f - mu[y]
    precision = torch.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
    g = out.taps["fc"].double()
    d = torch.stack([((g - m) @ precision * (g - m)).sum(1) for m in mu], dim=1)
    maha = scores["mahalanobis"].double()
    torch.testing.assert_close(maha, -d.min(1).values, rtol=1e-4, atol=1e-4)
