"""torchvision ResNets behind the contract: ImageNet-format weights and offline downloads."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lightning_ood.models import create_model
from lightning_ood.models.resnet import TorchvisionResNet


def test_resnet50_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(5)
    ref = torchvision.models.resnet50(weights=None).eval()
    for m in ref.modules():  # non-trivial BN statistics, as in trained weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)  # the ImageNet file format: keys conv1.weight ... fc.bias

    model = create_model("resnet50", weights=str(path)).eval()
    assert model.input_shape == (3, 224, 224)
    assert model.num_features == 2048 and model.num_classes == 1000
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = model.extract(x, ["stem", "layer4"])
        expected = ref(x)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert out.taps["stem"].shape == (1, 64, 56, 56)
    assert out.taps["layer4"].shape == (1, 2048, 7, 7)


def test_imagenet_name_offline_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    # torchvision's WeightsEnum.get_state_dict calls this name; patch it so no test downloads.
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    for name in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        with pytest.raises(RuntimeError, match=r"no network.*pass its path as weights=") as info:
            create_model("resnet50", weights=name)
        url = torchvision.models.ResNet50_Weights[name].url
        assert url in str(info.value)
        assert calls[-1] == url


def test_imagenet_name_uses_the_downloaded_state(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(2)
    ref = torchvision.models.resnet50(weights=None).eval()
    monkeypatch.setattr(
        torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: ref.state_dict()
    )
    model = create_model("resnet50", weights="IMAGENET1K_V2").eval()
    assert torch.equal(model.net.fc.weight, ref.fc.weight)
    assert torch.equal(model.net.layer3[2].conv2.weight, ref.layer3[2].conv2.weight)


def test_cifar_stem_refuses_imagenet_stem_weights(tmp_path: Path) -> None:
    path = tmp_path / "resnet34-imagenet-stem.pth"
    torch.save(torchvision.models.resnet34(weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"conv1.weight: checkpoint \(64, 3, 7, 7\) vs model"):
        create_model("resnet34", cifar_stem=True, weights=path)
    # The same file fits the ImageNet stem.
    model = create_model("resnet34", cifar_stem=False, weights=path)
    assert model.input_shape == (3, 224, 224)


def test_unknown_arch_and_missing_file(tmp_path: Path) -> None:
    # resnet18 became a known arch (the OpenOOD CIFAR model, issue 13); resnet101 is not
    with pytest.raises(ValueError, match="unknown arch 'resnet101'"):
        TorchvisionResNet("resnet101")
    with pytest.raises(FileNotFoundError, match="IMAGENET1K_V3"):
        create_model("resnet50", weights="IMAGENET1K_V3")  # not a known name, so a path
