"""iODIN (OpenOOD's ``iodin`` postprocessor): scores against an independent re-implementation
of OpenOOD's formula (mean cross-entropy, ``torch.ge`` sign, one-hot mask of the largest
|gradient|, per-channel std), the one-element step, and no mix-up with ODIN's memo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightning_ood import engine
from lightning_ood.detectors import DETECTORS, ODIN, build_detector
from lightning_ood.detectors.iodin import IODIN, largest_gradient_mask
from lightning_ood.models.base import OODBackbone

STD = [0.247, 0.243, 0.261]


class Small(OODBackbone):
    """conv(3->6)-ReLU-pool-fc(6->4): a 3-channel image model, as OpenOOD's iODIN assumes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.num_classes, self.num_features, self.input_shape = 4, 6, (3, 5, 5)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def get_classifier(self) -> nn.Linear:
        return self.fc


@pytest.fixture(scope="module")
def net() -> Small:
    torch.manual_seed(0)
    return Small().eval()


def _openood_iodin(net: Small, data: Tensor, temperature: float, noise: float) -> Tensor:
    """OpenOOD's IODINPostprocessor.postprocess, written out anew."""
    data = data.clone().requires_grad_(True)
    output = net(data)
    labels = output.detach().argmax(dim=1)
    loss = nn.CrossEntropyLoss()(output / temperature, labels)
    loss.backward()
    grad = data.grad.detach()
    flat = grad.abs().view(grad.shape[0], -1)
    mask = torch.zeros_like(flat)
    mask[torch.arange(flat.shape[0]), flat.argmax(dim=1)] = 1
    gradient = (torch.ge(grad, 0).float() - 0.5) * 2
    for c in range(3):
        gradient[:, c] = gradient[:, c] / STD[c]
    temp = data.detach() - noise * gradient * mask.view(grad.shape)
    with torch.no_grad():
        return torch.softmax(net(temp) / temperature, dim=1).max(dim=1).values


def _score(det: IODIN | ODIN, net: Small, x: Tensor) -> Tensor:
    with torch.no_grad():
        out = net.extract(x)
    return engine.score_batch({"d": det}, out, net, x)["d"]


@pytest.mark.parametrize(("temperature", "noise"), [(1000.0, 0.0014), (1.0, 0.05)])
def test_equals_openood_iodin(net: Small, temperature: float, noise: float) -> None:
    x = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    det = IODIN(temperature=temperature, epsilon=noise, input_std=STD)
    want = _openood_iodin(net, x, temperature, noise)
    np.testing.assert_allclose(_score(det, net, x).numpy(), want.numpy(), rtol=1e-6)


def test_one_element_moves_by_epsilon_over_its_std(net: Small) -> None:
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    det = IODIN(epsilon=0.01, input_std=STD)
    moved = (det.perturb(net, x) - x).flatten(1)
    assert torch.equal((moved != 0).sum(dim=1), torch.ones(8, dtype=torch.long))
    channel = moved.abs().argmax(dim=1) // 25
    expect = 0.01 / torch.tensor(STD)[channel]
    torch.testing.assert_close(moved.abs().amax(dim=1), expect)


def test_mask_and_memo_apart_from_odin(net: Small) -> None:
    grad = torch.tensor([[[1.0, -3.0], [3.0, 0.5]]])  # tie: the first in flattened order
    assert largest_gradient_mask(grad).tolist() == [[[0.0, 1.0], [0.0, 0.0]]]
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    odin, iodin = ODIN(epsilon=0.05), IODIN(epsilon=0.05)
    fresh_odin = _score(ODIN(epsilon=0.05), net, x.clone())
    fresh_iodin = _score(IODIN(epsilon=0.05), net, x.clone())
    a, b, c = _score(odin, net, x), _score(iodin, net, x), _score(odin, net, x)
    assert torch.equal(a, fresh_odin) and torch.equal(c, fresh_odin)
    assert torch.equal(b, fresh_iodin) and not torch.equal(a, b)


def test_registered_with_odins_hyperparameters() -> None:
    assert DETECTORS["iodin"] is IODIN
    det = build_detector("iodin")
    assert det.config() == {
        "type": "iodin",
        "temperature": 1000.0,
        "epsilon": 0.0014,
        "input_std": None,
        "name": "iodin",
    }
    assert det.needs_input_grad and not IODIN(epsilon=0.0).needs_input_grad
    assert IODIN.search_space == ODIN.search_space
