"""Checkpoint files: atomic writes (a kill never truncates a good file) and safe reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lightning_ood.checkpoint import SafeCheckpointIO
from lightning_ood.io import CheckpointError, UnsafeCheckpointError, atomic_save, safe_load
from lightning_ood.models.weights import read_checkpoint

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "checkpoints"


class Payload:
    """Unpickling this would create a marker file: the stand-in for hostile code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(str(marker))}, evil)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*NOT loaded.*run code"):
        safe_load(evil)
    with pytest.raises(UnsafeCheckpointError):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)  # a request is overridden
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt"):
        read_checkpoint(evil)  # the backbone weights loader shares the safe path
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*bytes\) is truncated or corrupt"):
        safe_load(cut)
    with pytest.raises(FileNotFoundError, match=r"absent\.ckpt"):
        safe_load(tmp_path / "absent.ckpt")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_reference_densenet_checkpoints_load_through_the_safe_path(name: str) -> None:
    ckpt = safe_load(REFERENCE / f"densenet100_{name}_reference.pth.tar")
    assert ckpt["epoch"] == 100
    assert ckpt["state_dict"]["fc.weight"].shape == (10 if name == "cifar10" else 100, 342)


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "last.ckpt"
    atomic_save({"v": torch.tensor(1)}, path)

    def broken_save(obj, f):  # type: ignore[no-untyped-def]
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert safe_load(path)["v"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def test_sigkill_during_a_write_leaves_the_good_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save({"v": torch.tensor(1)}, path)
    script = textwrap.dedent(
        f"""
        import torch
        from lightning_ood.io import atomic_save
        atomic_save({{"v": torch.tensor(2), "big": torch.zeros(300_000_000, dtype=torch.uint8)}},
                    {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".last.ckpt.*.tmp")) and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert leftovers, "the writer was killed before it started writing; nothing was tested"
    assert safe_load(path)["v"].item() == 1  # the good file is untouched
    atomic_save({"v": torch.tensor(3)}, path)  # the next save sweeps the stale temporary
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert safe_load(path)["v"].item() == 3
