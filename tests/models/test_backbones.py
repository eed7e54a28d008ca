"""The backbone contract, checked on every registered model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ood.models import OODBackbone, create_model, list_models

ALL_MODELS = list_models()
_CACHE: dict[str, OODBackbone] = {}


def _model(name: str) -> OODBackbone:
    """One eval-mode instance per model for the whole module (ResNet-50 is slow to build)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_model(name).eval()
    return _CACHE[name]


def _batch(model: OODBackbone) -> Tensor:
    # ImageNet-size inputs are costly on two CPU cores: one image there, two elsewhere.
    return model.example_input(1 if model.input_shape[-1] >= 224 else 2)


def test_registry_holds_the_expected_models() -> None:
    assert set(ALL_MODELS) >= {
        "densenet100",
        "lenet",
        "resnet34",
        "resnext50",
        "resnet50",
        "genome_lstm",
    }


@pytest.mark.parametrize("name", ALL_MODELS)
def test_extract_forward_and_head_agree(name: str) -> None:
    model = _model(name)
    x = _batch(model)
    b = x.shape[0]
    with torch.no_grad():
        out = model.extract(x, model.tap_names)
        h = model.forward_features(x)
        via_head = model.forward_head(h)
        direct = model(x)
    assert out.features.shape == (b, model.num_features)
    assert out.logits.shape == (b, model.num_classes)
    assert torch.equal(h, out.features)
    assert torch.equal(via_head, direct)
    assert torch.equal(direct, out.logits)
    # forward_head is the plain affine map of the classifier: logits = W h + b.
    clf = model.get_classifier()
    torch.testing.assert_close(direct, h @ clf.weight.T + clf.bias)
    assert out.tap("features") is out.features
    assert out.tap("logits") is out.logits


@pytest.mark.parametrize("name", ALL_MODELS)
def test_classifier_and_declared_shapes(name: str) -> None:
    model = _model(name)
    clf = model.get_classifier()
    assert isinstance(clf, nn.Linear)
    assert clf.in_features == model.num_features
    assert clf.out_features == model.num_classes
    assert model.input_kind in ("image", "tokens")
    assert model.example_input(3).shape == (3, *model.input_shape)
    if model.input_kind == "tokens":
        assert model.vocab_size > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_tap_has_the_batch_dimension(name: str) -> None:
    model = _model(name)
    x = _batch(model)
    with torch.no_grad():
        out = model.extract(x, list(model.tap_layers))
    assert set(out.taps) == set(model.tap_layers)
    for tap, value in out.taps.items():
        assert value.shape[0] == x.shape[0], tap
        assert torch.isfinite(value).all(), tap


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unknown_tap_lists_available_taps(name: str) -> None:
    model = _model(name)
    with pytest.raises(KeyError, match="no tap") as info:
        model.extract(_batch(model), ["not_a_layer"])
    for tap in model.tap_names:
        assert repr(tap) in str(info.value)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_weights_round_trip_reproduces_logits(name: str, tmp_path: Path) -> None:
    model = _model(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(123)  # the loaded model starts from a different random init
    loaded = create_model(name, weights=str(path)).eval()
    x = _batch(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_lenet_taps_are_post_relu_with_reference_shapes() -> None:
    model = _model("lenet")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        out = model.extract(x, ["conv1", "conv2", "fc1"])
        pre_conv1 = model.conv1(x)
    shapes = {"conv1": (4, 32, 26, 26), "conv2": (4, 64, 24, 24), "fc1": (4, 128)}
    for tap, shape in shapes.items():
        assert out.taps[tap].shape == shape
        assert out.taps[tap].min() >= 0
    # The taps are ReLU outputs: the conv1 tap equals ReLU of the raw conv and has zeros.
    assert torch.equal(out.taps["conv1"], F.relu(pre_conv1))
    assert (out.taps["conv1"] == 0).any()
    # In eval mode the penultimate feature is exactly ReLU(fc1), q = 128.
    assert torch.equal(out.features, out.taps["fc1"])
    assert model.num_features == 128


class _PytorchMnistNet(nn.Module):
    """The PyTorch MNIST example network FSSD trained (functional ReLUs), as a reference."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = torch.flatten(self.dropout1(x), 1)
        return self.fc2(self.dropout2(F.relu(self.fc1(x))))


def test_lenet_loads_the_reference_example_network(tmp_path: Path) -> None:
    ref = _PytorchMnistNet().eval()
    path = tmp_path / "mnist_cnn.pt"
    torch.save(ref.state_dict(), path)
    model = create_model("lenet", weights=path).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_lenet_rejects_wrong_input_size() -> None:
    with pytest.raises(ValueError, match=r"28x28"):
        _model("lenet")(torch.rand(2, 1, 32, 32))
    rgb = create_model("lenet", in_channels=3)
    assert rgb.input_shape == (3, 28, 28)
    assert rgb.conv1.in_channels == 3


def test_densenet_size_and_width() -> None:
    model = _model("densenet100")
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 0.77e6) / 0.77e6 < 0.01
    assert model.num_features == 342
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.extract(x, list(model.tap_layers))
    expected = {
        "conv1": (24, 32, 32),
        "block1": (24 + 16 * 12, 32, 32),
        "trans1": (108, 16, 16),
        "block2": (108 + 16 * 12, 16, 16),
        "trans2": (150, 8, 8),
        "block3": (150 + 16 * 12, 8, 8),
    }
    assert {k: tuple(v.shape[1:]) for k, v in out.taps.items()} == expected
    # features = global mean of ReLU(BN(block3)) (the reference avg_pool2d(out, 8)).
    pooled = F.avg_pool2d(model.relu(model.bn1(out.taps["block3"])), 8).flatten(1)
    torch.testing.assert_close(out.features, pooled)


@pytest.mark.parametrize(("name", "q"), [("resnet34", 512), ("resnext50", 2048)])
def test_cifar_resnets_taps_and_width(name: str, q: int) -> None:
    model = _model(name)
    assert model.num_features == q
    assert model.input_shape == (3, 32, 32)
    assert isinstance(model.net.maxpool, nn.Identity)
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert model.net.conv1.bias is None
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.extract(x, list(model.tap_layers))
    mult = 1 if name == "resnet34" else 4
    expected = {
        "stem": (64, 32, 32),
        "layer1": (64 * mult, 32, 32),
        "layer2": (128 * mult, 16, 16),
        "layer3": (256 * mult, 8, 8),
        "layer4": (512 * mult, 4, 4),
    }
    assert {k: tuple(v.shape[1:]) for k, v in out.taps.items()} == expected
    assert out.taps["stem"].min() >= 0  # post-ReLU
    torch.testing.assert_close(out.features, out.taps["layer4"].mean(dim=(2, 3)))
