"""``tv:NAME`` / ``timm:NAME`` models behind the backbone contract, built without weights."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from lightning_ood.io import UnsafeCheckpointError
from lightning_ood.models import NonLinearHeadError, create_model, list_taps
from lightning_ood.models.wrap import WrappedBackbone

#: name -> (image size, head path, q, one tap and its shape without batch) at num_classes=3.
#: A module named ``features`` is the tap ``net.features`` (``features`` is h(x)).
TV_FAMILIES = {
    "mobilenet_v2": (32, "classifier.1", 1280, "net.features", (1280, 1, 1)),
    "resnet18": (32, "fc", 512, "layer4", (512, 1, 1)),
    "wide_resnet50_2": (32, "fc", 2048, "layer1", (256, 8, 8)),
    "efficientnet_b0": (32, "classifier.1", 1280, "net.features", (1280, 1, 1)),
    "convnext_tiny": (32, "classifier.2", 768, "net.features", (768, 1, 1)),
    "vit_b_16": (32, "heads.head", 768, "encoder", (5, 768)),  # 2x2 patches + class token
}
#: timm name -> (q, one tap and its shape) at 32x32 inputs (ViT built with img_size=32).
TIMM_MODELS = {
    "resnet18": (512, "layer3", (256, 2, 2)),
    "vit_small_patch16_224": (384, "blocks.11", (5, 384)),
    "efficientnet_b0": (1280, "conv_head", (1280, 1, 1)),
    "convnext_atto": (320, "stages.3", (320, 1, 1)),
}


def _check_split(model: WrappedBackbone, tap: str, tap_shape: tuple[int, ...], q: int) -> None:
    """features/head split of a wrapped network: q, logits = head(features) = net(x), a tap."""
    x = torch.rand(2, *model.input_shape)
    with torch.no_grad():
        reference = model.net(x)  # the unwrapped network's own logits
        out = model.extract(x, [tap])
        via_head = model.get_classifier()(out.features)
    assert model.num_features == q
    assert out.features.shape == (2, q)
    assert out.logits.shape == (2, 3) and model.num_classes == 3
    assert (via_head - reference).abs().max() <= 1e-6
    assert (out.logits - reference).abs().max() <= 1e-6
    assert tuple(out.taps[tap].shape) == (2, *tap_shape)
    assert tap in model.tap_names and {"features", "logits"} <= set(model.tap_names)


@pytest.mark.parametrize("arch", list(TV_FAMILIES))
def test_torchvision_family_contract(arch: str) -> None:
    size, head, q, tap, tap_shape = TV_FAMILIES[arch]
    model = create_model(f"tv:{arch}", num_classes=3, image_size=size).eval()
    assert model.head_name == head
    assert model.input_shape == (3, size, size)
    _check_split(model, tap, tap_shape, q)


def test_torchvision_cnn_features_are_the_pooled_last_stage() -> None:
    model = create_model("tv:resnet18", num_classes=3, image_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model.extract(x, ["layer4", "layer1.0.conv1"])
    torch.testing.assert_close(out.features, out.taps["layer4"].mean(dim=(2, 3)))
    assert out.taps["layer1.0.conv1"].shape == (2, 64, 16, 16)


@pytest.mark.parametrize("arch", list(TIMM_MODELS))
def test_timm_model_contract(arch: str) -> None:
    import timm  # noqa: F401  (dev extra: a missing timm fails, never skips)

    q, tap, tap_shape = TIMM_MODELS[arch]
    model = create_model(f"timm:{arch}", num_classes=3, image_size=32).eval()
    assert model.input_shape == (3, 32, 32)
    _check_split(model, tap, tap_shape, q)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # the features are timm's own pre-logits
        pre = model.net.forward_head(model.net.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model.forward_features(x), pre, rtol=0, atol=0)
    assert model.get_classifier() is model.net.get_classifier()


def test_timm_in_channels_and_default_size() -> None:
    model = create_model("timm:resnet18", num_classes=4, in_channels=1)
    assert model.input_shape == (1, 224, 224)  # timm's pretrained_cfg input size
    assert model.net.conv1.in_channels == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tv:mobilenetv2", "'tv:mobilenet_v2'"),
        ("mobilenet_v2", "'tv:mobilenet_v2'"),
        ("resnet19", "'resnet18'"),
        ("timm:resnet_18", "'timm:resnet18'"),
    ],
)
def test_unknown_model_names_list_close_matches(name: str, expected: str) -> None:
    with pytest.raises(ValueError, match="close matches") as info:
        create_model(name)
    assert expected in str(info.value)


def test_timm_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(ImportError, match=r"pip install lightning_ood\[timm\]"):
        create_model("timm:resnet18")


def test_no_linear_head_names_model_and_argument() -> None:
    with pytest.raises(ValueError, match=r"tv:squeezenet1_1.*head=") as info:
        create_model("tv:squeezenet1_1", num_classes=3, image_size=64)
    assert "nn.Linear" in str(info.value)
    # Set by hand, a conv head works for the feature/logit detectors, and refuses W and b.
    model = create_model("tv:squeezenet1_1", num_classes=3, image_size=64, head="classifier")
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model.extract(x)
        reference = model.net(x)
    assert model.num_features == 512 * 3 * 3 and out.features.shape == (2, 4608)
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)
    with pytest.raises(NonLinearHeadError, match=r"'classifier' of tv:squeezenet1_1 is a Seq"):
        model.get_classifier()


def test_unknown_tap_lists_close_matches() -> None:
    model = create_model("tv:resnet18", num_classes=3, image_size=32)
    with pytest.raises(KeyError, match="no tap") as info:
        model.extract(torch.rand(1, 3, 32, 32), ["layer5"])
    msg = str(info.value)
    assert "close matches" in msg and "'layer4'" in msg and "lightning-ood models --taps" in msg


def test_list_taps_gives_every_module_with_its_shape() -> None:
    model = create_model("tv:resnet18", num_classes=3, image_size=32)
    taps = dict(list_taps(model))
    assert len(taps) == len(model.tap_layers) + 2
    assert taps["layer2"] == (128, 4, 4)
    assert taps["layer3.1.conv2"] == (256, 2, 2)
    assert taps["features"] == (512,) and taps["logits"] == (3,)


# -- weights -----------------------------------------------------------------------------------
@pytest.fixture()
def tv_resnet18() -> WrappedBackbone:
    torch.manual_seed(3)
    return create_model("tv:resnet18", num_classes=3, image_size=32).eval()


def _same_logits(a: WrappedBackbone, b: WrappedBackbone) -> None:
    x = torch.rand(2, *a.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "pack",
    [
        pytest.param(lambda m: m.net.state_dict(), id="torchvision-keys"),
        pytest.param(lambda m: m.state_dict(), id="wrapper-keys"),
        pytest.param(
            lambda m: {"state_dict": {f"backbone.{k}": v for k, v in m.state_dict().items()}},
            id="lightning-ckpt",
        ),
    ],
)
def test_local_weights_formats(tv_resnet18: WrappedBackbone, tmp_path: Path, pack) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "w.pth"
    torch.save(pack(tv_resnet18), path)
    torch.manual_seed(99)
    loaded = create_model("tv:resnet18", num_classes=3, image_size=32, weights=str(path))
    _same_logits(loaded, tv_resnet18)


def test_pickled_module_needs_opt_in(tv_resnet18: WrappedBackbone, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tv_resnet18.net, path)
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        create_model("tv:resnet18", num_classes=3, image_size=32, weights=str(path))
    loaded = create_model(
        "tv:resnet18", num_classes=3, image_size=32, weights=str(path), trust_pickle=True
    )
    _same_logits(loaded, tv_resnet18)


def test_mismatched_weights_name_the_first_mismatches(tmp_path: Path) -> None:
    other = tmp_path / "mobilenet.pth"
    torch.save(tvm.mobilenet_v2(num_classes=3).state_dict(), other)
    with pytest.raises(ValueError, match=r"does not match the architecture of tv:resnet18") as e:
        create_model("tv:resnet18", num_classes=3, weights=str(other))
    assert "missing keys (e.g. ['conv1.weight'" in str(e.value)
    wrong_classes = tmp_path / "r18_10.pth"
    torch.save(tvm.resnet18(num_classes=10).state_dict(), wrong_classes)
    with pytest.raises(ValueError, match=r"fc for 10 classes.*num_classes=3"):
        create_model("tv:resnet18", num_classes=3, weights=str(wrong_classes))


def test_rgb_weights_fold_into_one_channel(tmp_path: Path) -> None:
    rgb = tvm.resnet18(num_classes=3).eval()
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    grey = create_model(
        "tv:resnet18", num_classes=3, in_channels=1, image_size=28, weights=str(path)
    ).eval()
    assert grey.input_shape == (1, 28, 28)
    torch.testing.assert_close(grey.net.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():  # a grey image repeated on 3 channels gives the RGB model's logits
        torch.testing.assert_close(grey(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_offline_torchvision_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_a: object, **_k: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvm.MobileNet_V2_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="no network") as info:
        create_model("tv:mobilenet_v2", weights="IMAGENET1K_V1")
    assert "mobilenet_v2-b0353104.pth" in str(info.value)


def test_offline_timm_download_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw: object) -> nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match=r"timm:resnet18.*no network.*weights="):
        create_model("timm:resnet18", weights="pretrained")
