"""The console scripts and `python -m lightning_ood` exit 0 (a returned CLI object would not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "cmd",
    [
        [
            sys.executable,
            "-m",
            "lightning_ood",
            "test",
            "--config",
            "configs/demo.yaml",
            "--print_config",
        ],
        [
            str(Path(sys.executable).parent / "lightning-ood"),
            "fit",
            "--config",
            "configs/demo.yaml",
            "--print_config",
        ],
    ],
    ids=["python-m", "console-script"],
)
def test_cli_exits_zero(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: lightning_ood.data.FashionMNISTDataModule" in proc.stdout
    assert "model: lenet" in proc.stdout


@pytest.mark.parametrize(
    "cmd",
    [
        [sys.executable, "-m", "lightning_ood", "grid", "--help"],
        [str(Path(sys.executable).parent / "lightning-ood"), "grid", "--help"],
        [str(Path(sys.executable).parent / "lightning-ood-grid"), "--help"],
    ],
    ids=["python-m", "subcommand", "alias"],
)
def test_grid_is_a_subcommand_of_the_one_cli(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: lightning-ood grid" in proc.stdout and "--grid GRID" in proc.stdout
    # a LightningCLI subcommand on a Trainer: it takes the Trainer's devices and strategy
    assert "--trainer.devices" in proc.stdout and "--trainer.strategy" in proc.stdout
