"""The OOD-benchmark CIFAR models: ResNet-18 (OpenOOD v1.5) and WideResNet-40-2 (OE/energy)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_ood.models import create_model


def test_wrn40_2_size_width_and_taps() -> None:
    model = create_model("wrn40_2").eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 2.2e6) / 2.2e6 < 0.03  # the published 2.2 M
    assert model.num_features == 128 and model.num_classes == 10
    assert model.block1.layer[0].convShortcut is not None  # 16 -> 32 channels
    assert model.block1.layer[1].convShortcut is None
    assert len(model.block1.layer) == 6  # (40 - 4) / 6
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.extract(x, list(model.tap_layers))
    shapes = {k: tuple(v.shape[1:]) for k, v in out.taps.items()}
    assert shapes == {
        "conv1": (16, 32, 32),
        "block1": (32, 32, 32),
        "block2": (64, 16, 16),
        "block3": (128, 8, 8),
    }
    pooled = model.relu(model.bn1(out.taps["block3"])).mean(dim=(2, 3))
    torch.testing.assert_close(out.features, pooled)
    torch.testing.assert_close(out.logits, model.fc(pooled))


def test_wrn_dropout_only_in_training() -> None:
    model = create_model("wrn40_2", drop_rate=0.3)
    x = torch.rand(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_resnet18_cifar_stem_and_openood_keys(tmp_path: Path) -> None:
    model = create_model("resnet18").eval()
    assert model.num_features == 512 and model.input_shape == (3, 32, 32)
    assert isinstance(model.net.maxpool, nn.Identity)
    assert model.net.conv1.kernel_size == (3, 3) and model.net.conv1.stride == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # OpenOOD's ResNet18_32x32
    # An OpenOOD checkpoint names the projection shortcut `shortcut`, not `downsample`.
    state = model.net.state_dict()
    openood = {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}
    assert any(".shortcut." in k for k in openood)
    path = tmp_path / "openood_resnet18.ckpt"
    torch.save(openood, path)
    torch.manual_seed(5)
    loaded = create_model("resnet18", weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
