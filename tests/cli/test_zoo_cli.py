"""`lightning-ood models`, zoo models through fit/test, and the zoo configs' recipes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from _cli import base_config, ood_callback, run_cli, scheduled_lrs
from PIL import Image
from torchvision import models as tvm

from lightning_ood.cli import main, models_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LINE_ONLY = {"energy": {}, "line": {"delta": 0.6, "p_a": 10, "p_w": 10}}


def test_models_lists_registered_and_zoo_names(capsys: pytest.CaptureFixture[str]) -> None:
    text = models_main([])
    assert capsys.readouterr().out.strip() == text.strip()
    for name in ("densenet100", "resnet18", "wrn40_2", "mobilenet_v2", "vit_b_16", "wrap"):
        assert name in text
    assert "tv:NAME" in text and "timm:NAME" in text


def test_models_taps_prints_every_module_with_its_shape() -> None:
    text = models_main(["--taps", "tv:resnet18", "--model_kwargs", "{image_size: 32}"])
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in text.splitlines()[1:]}
    assert lines["layer3"] == "(256, 2, 2)"
    assert lines["layer4.1.bn2"] == "(512, 1, 1)"
    assert lines["features"] == "(512,)" and lines["logits"] == "(10,)"
    assert len(lines) == 67 + 2  # every named module of torchvision's ResNet-18, h(x), f(x)


def _lrs(cfg: str, epochs: list[int]) -> tuple[list[float], torch.optim.Optimizer]:
    lrs, opt, cli = scheduled_lrs(CONFIGS / cfg, epochs)
    assert cli.trainer.max_epochs == 100
    return lrs, opt


@pytest.mark.parametrize("cfg", ["resnet18_cifar10.yaml", "wrn40_2_cifar10.yaml"])
def test_cifar_benchmark_recipes(cfg: str) -> None:
    """SGD 0.1, momentum 0.9, Nesterov, wd 5e-4, cosine over 100 epochs."""
    lrs, opt = _lrs(cfg, [0, 50, 99])
    assert lrs == pytest.approx([0.1, 0.05, 0.05 * (1 + math.cos(0.99 * math.pi))], rel=1e-9)
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["weight_decay"]) == (0.9, True, 5e-4)


def test_line_mobilenetv2_config_has_the_appendix_hyperparameters() -> None:
    raw = yaml.safe_load((CONFIGS / "line_mobilenetv2_imagenet.yaml").read_text())
    assert raw["model"]["model"] == "tv:mobilenet_v2"
    dets = raw["trainer"]["callbacks"][0]["init_args"]["detectors"]
    assert dets["line"] == {"delta": 0.6, "p_a": 10, "p_w": 10}


def _jpeg(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def test_line_mobilenetv2_runs_end_to_end_on_a_tiny_imagenet_folder(tmp_path: Path) -> None:
    """The config as shipped, on 1000 one-image class folders and local random weights."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for k in range(1000):
            _jpeg(root / "imagenet" / split / f"n{k:08d}" / "a.JPEG", k)
    for i in range(8):
        _jpeg(root / "ood" / f"{i}.jpg", 5000 + i)
    weights = tmp_path / "mobilenet_v2.pth"
    torch.manual_seed(0)
    torch.save(tvm.mobilenet_v2().state_dict(), weights)
    override = {
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "callbacks": [ood_callback(LINE_ONLY)],
        },
        "model": {"channels_last": False, "model_kwargs": {"weights": str(weights)}},
        "data": {
            "init_args": {
                "root": str(root),
                "batch_size": 16,
                "eval_batch_size": 16,
                "num_workers": 0,
                "train_every": 50,  # 20 training images
                "test_every": 50,  # 20 ID test images
                "ood_sets": [{"name": "tiny_ood", "kind": "folder", "path": str(root / "ood")}],
            }
        },
    }
    over = tmp_path / "override.yaml"
    over.write_text(yaml.safe_dump(override))
    config = CONFIGS / "line_mobilenetv2_imagenet.yaml"
    args = ["test", "--config", str(config), "--config", str(over)]
    args += ["--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs")]
    cli = main(args)
    assert cli.model.hparams["model"] == "tv:mobilenet_v2"
    assert cli.model.backbone.num_features == 1280
    data = json.loads((Path(cli.trainer.log_dir) / "ood_results.json").read_text())
    line = data["metrics"]["line"]["tiny_ood"]
    assert (line["n_id"], line["n_ood"]) == (20, 8)
    assert 0.0 <= line["auroc"] <= 1.0
    assert data["detectors"]["line"]["delta"] == 0.6


def test_fit_and_test_tv_resnet18_on_one_channel_fashionmnist(
    tmp_path: Path, shared_data: Path
) -> None:
    cfg = base_config(shared_data, train_every=60, test_every=100, ood_every=100)
    cfg["data"]["init_args"]["ood_sets"] = ["mnist"]
    cfg["model"]["model"] = "tv:resnet18"
    cfg["model"]["model_kwargs"] = {"in_channels": 1, "image_size": 28}
    cfg["model"]["optimizer"] = {"class_path": "torch.optim.Adam", "init_args": {"lr": 1e-3}}
    dets = {"energy": {}, "line": {"delta": 10.0, "p_a": 10, "p_w": 10}, "mahalanobis": {}}
    cfg["trainer"]["callbacks"] = [ood_callback(dets)]
    run_cli(tmp_path, "r18", "fit", cfg)
    ckpt = tmp_path / "ckpt" / "r18" / "last.ckpt"
    stored = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert stored["hyper_parameters"]["model"] == "tv:resnet18"
    assert stored["state_dict"]["backbone.net.conv1.weight"].shape == (64, 1, 7, 7)
    proc = run_cli(tmp_path, "r18", "test", cfg, "--ckpt_path", str(ckpt))
    results = sorted((tmp_path / "logs" / "r18").glob("version_*/ood_results.json"))
    data = json.loads(results[-1].read_text())
    for name in dets:
        m = data["metrics"][name]["mnist"]
        assert (m["n_id"], m["n_ood"]) == (100, 100), name
        assert 0.0 <= m["auroc"] <= 1.0
    assert data["model"] == "tv:resnet18"
    acc = re.search(r"test/acc\W+([0-9.]+)", proc.stdout)
    assert acc is not None, proc.stdout[-2000:]
    assert float(acc.group(1)) > 0.3  # 1,000 training images, one epoch; chance is 0.1
