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


def _project_checkpoint(path: Path, member: LeNet) -> dict[str, Tensor]:
    """A lightning-ood ``last.ckpt`` as ``lightning-ood fit`` writes it: the task's state dict
    (LeNet backbone, fitted-detector buffers, FSSD's ``_extra_state`` dict) with an ensemble's
    record and member network beside it. Returns the backbone's tensors."""
    from lightning_ood.task import ClassificationTask

    torch.manual_seed(11)
    task = ClassificationTask(
        model="lenet",
        model_kwargs={"in_channels": 1},
        detectors={"fssd": {"taps": ["conv1", "fc1"]}, "msp": {}},
    )
    state = task.state_dict()
    assert isinstance(state["detectors.fssd._extra_state"], dict)  # what broke the loader
    state["detectors.de._extra_state"] = {"archs": [{"model": "lenet"}], "sources": ["m.ckpt"]}
    state.update({f"detectors.de.members.0.{k}": v for k, v in member.state_dict().items()})
    torch.save(
        {
            "epoch": 0,
            "global_step": 10,
            "pytorch-lightning_version": "2.6.0",
            "state_dict": state,
            "hyper_parameters": dict(task.hparams),
            "lightning_ood": {"data": {"input_shape": [1, 28, 28]}},
        },
        path,
    )
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_a_project_checkpoint_with_detector_extra_state_gives_its_backbone(
    trained: LeNet, tmp_path: Path
) -> None:
    """The fine-tuning recipe (``model_kwargs.weights: .../last.ckpt``) and ``grid --ckpt_path``
    on a checkpoint with FSSD and an ensemble: the backbone's tensors, never a member's."""
    from lightning_ood.task import ClassificationTask

    path = tmp_path / "last.ckpt"
    backbone = _project_checkpoint(path, member=trained)
    for model in (
        create_model("lenet", weights=path),
        load_weights(LeNet(), path),  # grid --ckpt_path
        ClassificationTask(model="lenet", model_kwargs={"weights": str(path)}).backbone,
    ):
        got = model.state_dict()
        assert set(got) == set(backbone)
        for k, v in backbone.items():
            assert torch.equal(got[k], v), k
            assert not torch.equal(got[k], trained.state_dict()[k]), k  # not the member's
    assert read_checkpoint(path).keys() == {f"backbone.{k}" for k in backbone}


def test_a_lenet_checkpoint_for_another_architecture_says_so(
    trained: LeNet, tmp_path: Path
) -> None:
    path = tmp_path / "last.ckpt"
    _project_checkpoint(path, member=trained)
    with pytest.raises(ValueError) as err:
        create_model("tv:resnet18", num_classes=10, in_channels=1, image_size=28, weights=path)
    msg = str(err.value)
    assert "holds no state_dict" not in msg
    assert f"weights file {str(path)!r} does not match the architecture of tv:resnet18" in msg
    assert "101 missing keys (e.g. ['bn1.weight' (64,)" in msg
    assert "7 unexpected keys (e.g. ['conv1.bias' (32,), 'conv2.weight' (64, 32, 3, 3)" in msg
    assert "conv1.weight: checkpoint (32, 1, 3, 3) vs model (64, 1, 7, 7)" in msg
    assert "hyper_parameters.model" in msg


def test_extra_state_is_no_weight_but_other_values_are_no_state_dict(tmp_path: Path) -> None:
    w = torch.ones(2)
    extra = tmp_path / "extra.pt"
    torch.save({"state_dict": {"fc.weight": w, "det._extra_state": {"taps": ["a"]}}}, extra)
    got = read_checkpoint(extra)
    assert list(got) == ["fc.weight"] and torch.equal(got["fc.weight"], w)
    odd = tmp_path / "odd.pt"
    torch.save({"state_dict": {"fc.weight": w, "note": "hello"}}, odd)
    with pytest.raises(RuntimeError, match=r"odd\.pt.* holds no state_dict"):
        read_checkpoint(odd)
