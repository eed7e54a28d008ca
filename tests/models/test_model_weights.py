"""The shared ``weights=`` loader: file formats, prefixes and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_ood.models import create_model
from lightning_ood.models.lenet import LeNet
from lightning_ood.models.weights import load_weights, read_checkpoint, strip_prefix


class _Config:
    """A plain Python object, as some training scripts pickle into their checkpoints."""

    lr = 0.1


@pytest.fixture()
def trained() -> LeNet:
    torch.manual_seed(7)
    return create_model("lenet").eval()


def _logits(model: LeNet) -> Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(3, 1, 28, 28))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(
            lambda sd: {"epoch": 100, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
            id="reference-dataparallel",
        ),
        pytest.param(
            lambda sd: {
                "epoch": 3,
                "global_step": 42,
                "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {"lr": 0.1, "model": "lenet"},
                "state_dict": {
                    **{f"model.{k}": v for k, v in sd.items()},
                    "detectors.line.mask": torch.ones(2, 3),
                    "detectors.fssd.fc1.weight": torch.zeros(1),  # a decoy with a model-like name
                },
            },
            id="lightning",
        ),
        pytest.param(
            lambda sd: {"state_dict": {f"model.module.{k}": v for k, v in sd.items()}},
            id="lightning-dataparallel",
        ),
    ],
)
def test_formats_load_to_identical_logits(trained: LeNet, tmp_path: Path, wrap) -> None:
    path = tmp_path / "w.ckpt"
    torch.save(wrap(trained.state_dict()), path)
    torch.manual_seed(0)
    model = create_model("lenet", weights=path)
    assert torch.equal(_logits(model), _logits(trained))


def test_strip_prefix_picks_the_best_fitting_prefix() -> None:
    t = torch.zeros(1)
    expected = {"conv1.weight", "fc.weight", "fc.bias"}
    state = {"model.conv1.weight": t, "model.fc.weight": t, "model.fc.bias": t, "x.fc.bias": t}
    assert set(strip_prefix(state, expected)) == expected
    assert strip_prefix({"fc.bias": t}, expected) == {"fc.bias": t}
    assert strip_prefix({"other": t}, expected) == {"other": t}


def test_class_count_mismatch_names_both(tmp_path: Path) -> None:
    path = tmp_path / "five.pt"
    torch.save(create_model("lenet", num_classes=5).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"has fc2 for 5 classes but lenet was built with num_classes=10"
    ):
        create_model("lenet", num_classes=10, weights=path)


def test_shape_mismatch_lists_tensors(tmp_path: Path) -> None:
    path = tmp_path / "rgb.pt"
    torch.save(create_model("lenet", in_channels=3).state_dict(), path)
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(32, 3, 3, 3\) vs model"):
        create_model("lenet", in_channels=1, weights=path)


def test_missing_batchnorm_counters_are_tolerated(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = create_model("densenet100").eval()
    for m in src.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    model = create_model("densenet100", weights=path).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        read_checkpoint(tmp_path / "absent.pt")

    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.randn(100, 100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(RuntimeError, match=r"could not read weights file .*truncated.pt"):
        read_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(RuntimeError, match=r"garbage.pt"):
        read_checkpoint(garbage)

    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "note": "no weights"}, no_tensors)
    with pytest.raises(RuntimeError, match=r"meta.pt.* holds no state_dict"):
        read_checkpoint(no_tensors)

    objects = tmp_path / "objects.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "cfg": _Config()}, objects)
    with pytest.raises(RuntimeError, match=r"objects.pt.*Python objects"):
        read_checkpoint(objects)


def test_load_weights_returns_the_model(trained: LeNet, tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    target = LeNet()
    assert load_weights(target, path) is target
    assert torch.equal(target.fc2.bias, trained.fc2.bias)
