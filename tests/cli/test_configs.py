"""Every config parses, prints and instantiates; the training recipes give the papers' LRs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _cli import scheduled_lrs

from lightning_ood.cli import main
from lightning_ood.models import OODBackbone

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOP_LEVEL = sorted(CONFIGS.glob("*.yaml"))
#: Group configs are fragments composed on top of a base config.
GROUPS = {p: CONFIGS / "line_densenet_cifar10.yaml" for p in sorted(CONFIGS.glob("ood/*.yaml"))}


def _args(cfg: Path) -> list[str]:
    if cfg in GROUPS:
        return ["--config", str(GROUPS[cfg]), "--config", str(cfg)]
    return ["--config", str(cfg)]


def test_configs_exist() -> None:
    names = {p.stem for p in TOP_LEVEL}
    assert {"demo", "lenet_fashionmnist", "densenet_cifar10", "line_densenet_cifar10"} <= names
    assert GROUPS


@pytest.mark.parametrize("cfg", TOP_LEVEL + list(GROUPS), ids=lambda p: p.stem)
def test_config_prints(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["test", *_args(cfg), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(cfg.read_text())
    if "model" in raw:
        assert printed["model"]["model"] == raw["model"]["model"]
    assert printed["data"]["class_path"].startswith("lightning_ood.data.")
    if "data" in raw and "ood_sets" in raw["data"].get("init_args", {}):
        assert printed["data"]["init_args"]["ood_sets"] == raw["data"]["init_args"]["ood_sets"]


@pytest.mark.parametrize("cfg", TOP_LEVEL + list(GROUPS), ids=lambda p: p.stem)
def test_config_instantiates(cfg: Path, tmp_path: Path) -> None:
    extra = ["--checkpoint_root", str(tmp_path), "--log_root", str(tmp_path)]
    raw = yaml.safe_load(cfg.read_text())
    weights = (raw.get("model") or {}).get("model_kwargs", {}).get("weights")
    if weights and not Path(weights).exists():  # a user's local file (e.g. ImageNet ResNet-50)
        extra += ["--model.model_kwargs.weights", "null"]
    cli = main([*_args(cfg), *extra], run=False)
    assert isinstance(cli.model.backbone, OODBackbone)
    assert cli.model.hparams["num_classes"] == cli.model.backbone.num_classes
    ood = [c for c in cli.trainer.callbacks if type(c).__name__ == "OODEvaluation"]
    assert len(ood) == 1
    assert cli.datamodule.test_set_names[0] == cli.datamodule.id_name


def _lrs(cfg: str, epochs: list[int]) -> list[float]:
    return scheduled_lrs(CONFIGS / cfg, epochs)[0]


def test_densenet_recipe_learning_rates() -> None:
    lrs = _lrs("densenet_cifar10.yaml", [0, 49, 50, 75, 90])
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001], rel=1e-9)
    cli = main(["--config", str(CONFIGS / "densenet_cifar10.yaml")], run=False)
    opt = cli.model.configure_optimizers()["optimizer"]
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)
    assert (
        cli.datamodule.hparams.get("batch_size", getattr(cli.datamodule, "batch_size", None)) == 64
    )
    assert cli.trainer.max_epochs == 100


def test_lenet_and_resnet_recipe_learning_rates() -> None:
    assert _lrs("lenet_fashionmnist.yaml", [0, 1, 2, 13]) == pytest.approx(
        [1.0, 0.7, 0.49, 0.7**13], rel=1e-9
    )
    assert _lrs("resnet34_cifar10.yaml", [0, 149, 150, 249, 250]) == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001], rel=1e-9
    )
