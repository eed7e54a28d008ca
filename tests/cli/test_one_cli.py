"""One command line (issue 24 item 1): every subcommand is listed by `lightning-ood --help`;
`grid` is a LightningCLI subcommand on a Trainer, so `--trainer.devices 2 --trainer.strategy
ddp` runs it on two ranks with the numbers of one process; no private LightningCLI method is
overridden without the upstream issue it works around; the class count is checked by one
function, for the CLI (grid included) and the task alike."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningCLI
from toys import LINE_GRID_SPEC

from lightning_ood import cli
from lightning_ood.cli import OODCLI, main
from lightning_ood.task import ClassificationTask, check_class_count
from lightning_ood.trainer import OODTrainer, device_to_trainer

ROOT = Path(__file__).resolve().parents[2]
LENET = ROOT / "configs" / "lenet_fashionmnist.yaml"
EVERY_SUBCOMMAND = ("fit", "validate", "test", "predict", "grid", "models", "inspect", "serve")


def test_help_lists_every_subcommand() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ood", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    for name in EVERY_SUBCOMMAND:
        assert f" {name}" in text, name
    # grid among the Trainer subcommands, with its description; the others after them
    listed = text.split("Available subcommands:")[1]
    assert "grid Grid-search a detector's hyperparameters from cached features" in listed
    for name, what in cli._EXTRA_SUBCOMMANDS.items():
        assert f"{name}: {' '.join(what.split())}" in listed


# -- grid on a Trainer ---------------------------------------------------------------------------
def _grid_file(tmp: Path) -> Path:
    path = tmp / "grid.yaml"
    # id_val_fraction: the seeded split is drawn on the gathered ID set
    path.write_text(yaml.safe_dump(LINE_GRID_SPEC))
    return path


def _grid_args(tmp: Path, shared_data: Path, out: str, cache: str) -> list[str]:
    """The old spelling (`--config`, `--grid`, bare `--no_progress`) plus config overrides: a
    small real slice (250 training, 250 ID test, 250 MNIST, 250 KMNIST images)."""
    return [
        "--config", str(LENET),
        "--grid", str(_grid_file(tmp)),
        "--cache_dir", str(tmp / cache),
        "--out", str(tmp / out),
        "--no_progress",
        "--data.init_args.root", str(shared_data),
        "--data.init_args.ood_sets", "[mnist]",
        "--data.init_args.train_every", "240",
        "--data.init_args.test_every", "40",
        "--data.init_args.ood_every", "40",
        "--data.init_args.num_workers", "0",
        "--log_root", str(tmp / "logs"),
        "--checkpoint_root", str(tmp / "ckpt"),
        "--trainer.accelerator", "cpu",
    ]  # fmt: skip


def _run_grid(args: list[str]) -> subprocess.CompletedProcess[str]:
    """A real `lightning-ood grid` process, as a user starts it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_ood", "grid", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def _numbers(x: Any, y: Any, where: str = "") -> None:
    """Equal structures; floats to 1e-6."""
    if isinstance(x, dict):
        assert set(x) == set(y), where
        for k in x:
            _numbers(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _numbers(a, b, f"{where}[{i}]")
    elif isinstance(x, float):
        assert y == pytest.approx(x, abs=1e-6, nan_ok=True), where
    else:
        assert x == y, where


@pytest.mark.integration
def test_grid_ddp_on_two_ranks_equals_one_process(tmp_path: Path, shared_data: Path) -> None:
    """`lightning-ood grid --trainer.devices 2 --trainer.strategy ddp` (gloo, CPU): each rank
    extracts its shard, fits reduce, scores gather; grid_results.json equals one process's to
    1e-6 (rows, selection, test and reference rows, sizes, threshold). Rank 0 alone writes;
    each rank caches its shard under its own key, and a second two-rank run reads them."""
    one = _run_grid([*_grid_args(tmp_path, shared_data, "one", "c1"), "--trainer.devices", "1"])
    ddp = [*_grid_args(tmp_path, shared_data, "two", "c2"), "--trainer.devices", "2"]
    _run_grid([*ddp, "--trainer.strategy", "ddp"])
    a = json.loads((tmp_path / "one" / "grid_results.json").read_text())
    b = json.loads((tmp_path / "two" / "grid_results.json").read_text())
    assert (a["meta"]["world_size"], b["meta"]["world_size"]) == (1, 2)
    for key in ("kind", "base", "grid", "select_metric", "rows", "best", "test", "reference"):
        _numbers(a[key], b[key], key)
    for key in ("n_train", "n_id_val", "n_id_test", "best_config", "threshold", "protocol"):
        _numbers(a["meta"][key], b["meta"][key], key)
    assert (a["meta"]["n_train"], a["meta"]["n_id_val"], a["meta"]["n_id_test"]) == (250, 125, 125)
    assert "selected" in one.stdout
    # rank 0 wrote the results once; two cache entries per set, one per rank's shard
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "grid_results.csv",
        "grid_results.json",
        "grid_results.md",
    ]
    assert len(list((tmp_path / "c1").rglob("taps-*.pt"))) == 4
    assert len(list((tmp_path / "c2").rglob("taps-*.pt"))) == 8
    assert b["meta"]["cache"]["misses"] == 4
    _run_grid([*ddp, "--trainer.strategy", "ddp", "--out", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "grid_results.json").read_text())
    assert again["meta"]["cache"]["hits"] == 4 and again["meta"]["cache"]["misses"] == 0
    _numbers(b["rows"], again["rows"])
    _numbers(b["test"], again["test"])


@pytest.mark.integration
def test_grid_ddp_layer_ensemble_combiner_equals_one_process(
    tmp_path: Path, shared_data: Path
) -> None:
    """A three-tap Mahalanobis: the class statistics reduce across ranks, and the selection's
    combiner split and the shipped logistic combiner are drawn on the gathered scores; the
    two-rank grid equals one process to 1e-6, the shipped combiner's record included."""
    spec = tmp_path / "maha.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "detector": "mahalanobis",
                "base": {"taps": ["conv2", "fc1", "features"]},
                "grid": {"standardize": [False, True]},
                "val_ood_sets": ["kmnist"],
                "id_val_fraction": 0.5,
            }
        )
    )
    results = []
    for n, extra in (("1", []), ("2", ["--trainer.strategy", "ddp"])):
        args = _grid_args(tmp_path, shared_data, f"out{n}", "cache")
        args[args.index("--grid") + 1] = str(spec)
        _run_grid([*args, "--no_cache", "--trainer.devices", n, *extra])
        results.append(json.loads((tmp_path / f"out{n}" / "grid_results.json").read_text()))
    a, b = results
    for key in ("rows", "best", "test"):
        _numbers(a[key], b[key], key)
    for key in ("shipped_combiner", "threshold", "n_id_val", "n_id_test", "n_train"):
        _numbers(a["meta"][key], b["meta"][key], key)
    assert a["meta"]["shipped_combiner"]["method"] == "logistic"
    assert (a["meta"]["shipped_combiner"]["n_id"], a["meta"]["shipped_combiner"]["n_ood"]) == (
        125,
        250,
    )
    assert not (tmp_path / "cache").exists()


def test_device_is_a_deprecated_alias_of_the_trainer_flags(
    tmp_path: Path, shared_data: Path
) -> None:
    """`--device cpu` (the old grid flag) warns and builds the trainer on the CPU; the grid
    then runs as with `--trainer.accelerator cpu`."""
    args = [a for a in _grid_args(tmp_path, shared_data, "out", "cache") if a != "cpu"]
    args.remove("--trainer.accelerator")
    with pytest.warns(FutureWarning, match=r"--device is deprecated.*accelerator cpu"):
        run = main(["grid", *args, "--device", "cpu", "--no_cache", "true"])
    assert isinstance(run.trainer.accelerator, CPUAccelerator)
    assert run.trainer.grid_result is not None
    assert run.trainer.grid_result.meta["cache"] is None  # --no_cache true
    assert run.trainer.grid_result.meta["cli_overrides"][:2] == [
        "--data.init_args.root",
        str(shared_data),
    ]
    assert (tmp_path / "out" / "grid_results.json").is_file()
    assert not (tmp_path / "cache").exists()


def test_grid_refuses_launchers_that_cannot_return_its_result(tmp_path: Path) -> None:
    """ddp_spawn would run the grid in workers that cannot hand the result back: refused by
    name before any process starts."""
    trainer = OODTrainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match=r"one device or with --trainer.strategy ddp.*ddp_spawn"):
        trainer.grid(None, None, str(_grid_file(tmp_path)))  # type: ignore[arg-type]


def test_grid_overrides_recorded_are_the_config_flags() -> None:
    argv = ["--config", "a.yaml", "--grid", "g.yaml", "--no_progress", "--model", "m.yaml"]
    argv += ["--data.init_args.train_every", "10", "--no_cache", "true", "--out=o"]
    assert cli._overrides(argv) == ["--model", "m.yaml", "--data.init_args.train_every", "10"]


@pytest.mark.parametrize(
    ("device", "expected"),
    [("auto", ("auto", 1)), ("cpu", ("cpu", 1)), ("cuda", ("cuda", 1)), ("cuda:1", ("cuda", [1]))],
)
def test_device_values_map_to_accelerator_and_devices(device: str, expected: tuple) -> None:
    assert device_to_trainer(device) == expected


def test_device_values_the_old_flag_refused_are_named() -> None:
    with pytest.raises(ValueError, match=r"--device 'tpu:x'.*--trainer.accelerator"):
        device_to_trainer("tpu:x")


# -- no unexplained private overrides ------------------------------------------------------------
def test_private_lightningcli_overrides_name_their_upstream_issue() -> None:
    """Every private LightningCLI method OODCLI overrides carries a comment naming the
    Lightning issue it works around, and cli.py calls no private LightningCLI method."""
    private = [
        n
        for n in OODCLI.__dict__
        if n.startswith("_") and not n.startswith("__") and hasattr(LightningCLI, n)
    ]
    assert private == ["_parse_ckpt_path"]
    for name in private:
        assert "Lightning-AI/pytorch-lightning#" in inspect.getsource(getattr(OODCLI, name))
    tree = ast.parse(Path(cli.__file__).read_text())
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name | ast.Call)
        and node.func.attr.startswith("_")
        and not node.func.attr.startswith("__")
    }
    inherited = {n for n in called if hasattr(LightningCLI, n) and n not in OODCLI.__dict__}
    assert inherited == set()


# -- the class count, in one place ---------------------------------------------------------------
def test_class_count_messages() -> None:
    check_class_count(10, 10, "DM")
    check_class_count(10, None, "DM")  # a datamodule that does not say
    with pytest.raises(ValueError, match=r"DM has 100 classes but .* num_classes=10; set --model"):
        check_class_count(10, 100, "DM")
    with pytest.raises(ValueError) as info:
        check_class_count(10, 100, "DM", model="lenet", ckpt_path="a.ckpt", trained_on="FMNIST")
    text = str(info.value)
    assert "--ckpt_path a.ckpt holds a lenet trained for 10 classes on FMNIST" in text
    assert "--model.num_classes cannot change it" in text and "set --model" not in text


def test_grid_and_the_task_refuse_another_class_count_alike(
    tmp_path: Path, shared_data: Path
) -> None:
    """`grid` runs no Lightning loop (so no `setup`): the CLI's guard refuses a 5-class LeNet
    on the 10-class FashionMNIST before any data is read; `ClassificationTask.setup` gives the
    same message through the same function."""
    args = _grid_args(tmp_path, shared_data, "out", "cache")
    with pytest.raises(SystemExit) as exc:
        main(["grid", *args, "--model.num_classes", "5"])
    want = (
        "the datamodule FashionMNISTDataModule has 10 classes but the model is built with "
        "num_classes=5; set --model.num_classes 10"
    )
    assert str(exc.value) == f"lightning-ood grid: {want}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()

    class _Data:
        def hand_off_meta(self) -> dict[str, Any]:
            return {"num_classes": 10}

    _Data.__name__ = "FashionMNISTDataModule"
    task = ClassificationTask(model="lenet", num_classes=5, model_kwargs={"in_channels": 1})
    task._trainer = SimpleNamespace(datamodule=_Data())  # type: ignore[assignment]
    with pytest.raises(ValueError) as err:
        task.setup("test")
    assert str(err.value) == want
