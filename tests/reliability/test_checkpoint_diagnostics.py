"""Checkpoint errors name the real cause: not a checkpoint, truncated, unsafe, or a device this
machine lacks; bare weights given to `--ckpt_path`, and model flags the checkpoint replaces."""

from __future__ import annotations

import copy
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from _cli import base_config

import lightning_ood
from lightning_ood.checkpoint import SafeCheckpointIO
from lightning_ood.cli import main
from lightning_ood.io import (
    CheckpointDeviceError,
    CheckpointError,
    NotACheckpointError,
    TruncatedCheckpointError,
    UnsafeCheckpointError,
    safe_load,
)

REFERENCE = (
    Path(__file__).resolve().parents[2]
    / ".."
    / "shared"
    / "data"
    / "checkpoints"
    / "densenet100_cifar10_reference.pth.tar"
).resolve()
COPY_AGAIN = "copy it again"


class Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this must never run",))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """One file per failure kind, and good ones in both torch formats."""
    g = torch.Generator().manual_seed(0)
    f = {name: tmp_path / name for name in ("good.ckpt", "legacy.pth", "random.ckpt")}
    torch.save({"state_dict": {"w": torch.randn(2000, generator=g)}}, f["good.ckpt"])
    torch.save(
        {"w": torch.randn(2000, generator=g)}, f["legacy.pth"], _use_new_zipfile_serialization=False
    )
    f["random.ckpt"].write_bytes(
        torch.randint(0, 256, (5000,), generator=g, dtype=torch.uint8).numpy().tobytes()
    )
    for name in ("good.ckpt", "legacy.pth"):
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(f[name].read_bytes()[: f[name].stat().st_size // 2])
        f[f"cut-{name}"] = cut
    f["empty.ckpt"] = tmp_path / "empty.ckpt"
    f["empty.ckpt"].write_bytes(b"")
    f["notes.txt"] = tmp_path / "notes.txt"
    f["notes.txt"].write_text("epoch: 3, accuracy 0.91\n")
    f["plain.pkl"] = tmp_path / "plain.pkl"
    f["plain.pkl"].write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    f["photos.zip"] = tmp_path / "photos.zip"
    with zipfile.ZipFile(f["photos.zip"], "w") as z:
        z.writestr("a.txt", "not a checkpoint")
    f["evil.ckpt"] = tmp_path / "evil.ckpt"
    torch.save({"w": torch.ones(2), "x": Payload()}, f["evil.ckpt"])
    return f


@pytest.mark.parametrize(
    ("name", "error", "says"),
    [
        ("random.ckpt", NotACheckpointError, "not a torch checkpoint"),
        ("notes.txt", NotACheckpointError, r"starts with b'epoc'"),
        ("plain.pkl", NotACheckpointError, "a Python pickle that torch.save did not write"),
        ("photos.zip", NotACheckpointError, "zip archive without the data.pkl"),
        ("cut-good.ckpt", TruncatedCheckpointError, COPY_AGAIN),
        ("cut-legacy.pth", TruncatedCheckpointError, COPY_AGAIN),
        ("empty.ckpt", TruncatedCheckpointError, r"empty \(0 bytes\).*" + COPY_AGAIN),
        ("evil.ckpt", UnsafeCheckpointError, "could run code"),
    ],
)
def test_each_failure_gets_its_own_diagnosis(
    files: dict[str, Path], name: str, error: type, says: str
) -> None:
    with pytest.raises(error, match=says) as exc:
        safe_load(files[name])
    assert isinstance(exc.value, CheckpointError)  # one base class for callers
    assert name in str(exc.value)
    message = str(exc.value)
    # the wrong diagnoses of before: random bytes "could run code", a good file "corrupt"
    if error is not UnsafeCheckpointError:
        assert "run code" not in message and "NOT loaded" not in message
    if error is not TruncatedCheckpointError:
        assert COPY_AGAIN not in message and "truncated" not in message


def test_good_files_in_both_torch_formats_load(files: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(0)
    expected = torch.randn(2000, generator=g)
    assert torch.equal(safe_load(files["good.ckpt"])["state_dict"]["w"], expected)
    assert safe_load(files["legacy.pth"])["w"].shape == (2000,)
    assert safe_load(REFERENCE)["state_dict"]["fc.weight"].shape == (10, 342)


def test_a_good_checkpoint_mapped_to_an_absent_device_is_a_device_error(
    files: dict[str, Path], lenet_fitted: dict
) -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    absent = ["cuda", torch.device("cuda")] if count == 0 else []
    for location in [*absent, f"cuda:{count}"]:  # cuda:<count> exists on no machine
        with pytest.raises(
            CheckpointDeviceError, match=rf"{count} CUDA device\(s\).*map_location='cpu'"
        ):
            safe_load(files["good.ckpt"], map_location=location)
    with pytest.raises(CheckpointDeviceError, match=r"device string: gpu.*not a fault of the file"):
        safe_load(files["good.ckpt"], map_location="gpu")
    if count == 0:  # the case: the hand-off loader asked for CUDA on a CPU machine
        with pytest.raises(CheckpointDeviceError) as exc:
            lightning_ood.load(lenet_fitted["ckpt"], map_location="cuda")
        assert "truncated" not in str(exc.value) and COPY_AGAIN not in str(exc.value)
    else:
        assert safe_load(files["good.ckpt"], map_location="cuda")["state_dict"]["w"].is_cuda
    assert lightning_ood.load(lenet_fitted["ckpt"]).thresholds  # the file is fine


def test_bare_weights_are_refused_as_a_checkpoint_with_the_flag_that_takes_them(
    tmp_path: Path, shared_data: Path
) -> None:
    with pytest.raises(NotACheckpointError, match="bare weights file") as exc:
        SafeCheckpointIO().load_checkpoint(REFERENCE)
    assert f"--model.model_kwargs.weights {REFERENCE}" in str(exc.value)
    # through the CLI: refused while parsing, before a model or a dataset is built
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(shared_data)))
    with pytest.raises(NotACheckpointError, match="bare weights file") as exc:
        main(["test", "--config", str(cfg), "--ckpt_path", str(REFERENCE)])
    assert "--model.model_kwargs.weights" in str(exc.value)


def test_flags_the_checkpoint_replaces_are_warned_and_the_class_count_advice_helps(
    tmp_path: Path, lenet_fitted: dict
) -> None:
    """The session LeNet (10 FashionMNIST classes) with `--model.model densenet100
    --model.num_classes 100` on CIFAR-100: both flags are replaced by the checkpoint's values
    (warned), and the 10-vs-100 class mismatch is refused before any data is read, without
    recommending the --model.num_classes the user already gave."""
    cfg = copy.deepcopy(lenet_fitted["config"])
    cfg["data"] = {
        "class_path": "lightning_ood.data.CIFAR100DataModule",
        "init_args": {"root": str(tmp_path / "no-cifar100-here"), "num_workers": 0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = [
        "test", "--config", str(path), "--ckpt_path", str(lenet_fitted["ckpt"]),
        "--checkpoint_root", str(tmp_path / "ckpt"), "--log_root", str(tmp_path / "logs"),
        "--model.model", "densenet100", "--model.num_classes", "100",
    ]  # fmt: skip
    with pytest.warns(UserWarning) as warned, pytest.raises(SystemExit) as exc:
        main(args)
    texts = [str(w.message) for w in warned if "--ckpt_path" in str(w.message)]
    assert any("model='lenet' replaces the given model='densenet100'" in t for t in texts), texts
    assert any("num_classes=10 replaces the given num_classes=100" in t for t in texts), texts
    message = str(exc.value)
    assert "trained for 10 classes on FashionMNIST" in message
    assert "CIFAR100DataModule has 100 classes" in message
    assert "set --model.num_classes" not in message
    assert "--model.num_classes cannot change it" in message
    assert not (tmp_path / "no-cifar100-here").exists()  # refused before any data access
