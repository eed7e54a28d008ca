"""Run folders stay under their roots, and ``--overwrite`` never loses the earlier run before
the new one exists; a refused argument is the last line the user reads."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _cli import HELPERS, ROOT, base_config, ood_callback, run_cli

from lightning_ood.cli import main
from lightning_ood.runs import REPLACED_PREFIX, check_experiment, run_folder


@pytest.mark.parametrize(
    "name",
    ["", "  ", "/abs/run", "~/run", "../x", "../../x", "a/../../x", "a/./b", ".", "C:\\runs\\x"],
)
def test_experiment_names_that_leave_the_roots_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="--experiment"):
        check_experiment(name)


def test_nested_experiment_names_keep_working(tmp_path: Path) -> None:
    assert run_folder(tmp_path, "bench/lenet_seed1") == tmp_path / "bench" / "lenet_seed1"
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside"):
        run_folder(tmp_path / "root", "link/run")


def _args(tmp: Path, cfg: dict) -> list[str]:
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return [
        "--config", str(tmp / "cfg.yaml"),
        "--checkpoint_root", str(tmp / "ckpt"), "--log_root", str(tmp / "logs"),
    ]  # fmt: skip


def _small(shared_data: Path) -> dict:
    cfg = base_config(shared_data, test_every=40, ood_every=40, ood_sets=["mnist"])
    cfg["trainer"].update({"limit_train_batches": 2, "limit_val_batches": 1})
    cfg["trainer"]["callbacks"] = [ood_callback({"energy": {}}, per_set_holdout=0)]
    return cfg


@pytest.mark.parametrize(
    ("experiment", "victim"),
    [("{tmp}/elsewhere", "elsewhere"), ("", "ckpt"), ("../../x", None)],
)
def test_fit_never_writes_or_deletes_outside_its_roots(
    tmp_path: Path, shared_data: Path, experiment: str, victim: str | None
) -> None:
    """Probes 6-8: an absolute folder, an empty name (the checkpoint root itself), '..'."""
    work = tmp_path / "work"
    work.mkdir()
    if victim:
        (tmp_path / victim).mkdir(exist_ok=True)
        (tmp_path / victim / "precious.ckpt").write_bytes(b"trained for a week")
    args = ["fit", *_args(work, _small(shared_data)), "--overwrite", "true"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if victim == "ckpt":  # the root itself holds a run's files
        args += ["--checkpoint_root", str(tmp_path / "ckpt")]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--experiment", experiment.format(tmp=tmp_path)])
    assert "an experiment name" in str(exc.value) and "--experiment" in str(exc.value)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, moved or deleted
    if victim:
        assert (tmp_path / victim / "precious.ckpt").read_bytes() == b"trained for a week"


def _earlier_run(folder: Path, lenet_fitted: dict) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    for name in ("last.ckpt", "fitted.ckpt"):
        shutil.copy(lenet_fitted["ckpt"], folder / name)
    return {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}


def test_overwrite_restores_the_earlier_run_when_the_new_one_fails_before_a_checkpoint(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(HELPERS))
    folder = tmp_path / "ckpt" / "lenet"
    earlier = _earlier_run(folder, lenet_fitted)
    cfg = _small(shared_data)
    cfg["trainer"]["callbacks"].append({"class_path": "kill_callback.FailAt"})
    args = ["fit", *_args(tmp_path, cfg), "--experiment", "lenet", "--overwrite", "true"]
    with pytest.raises(RuntimeError, match="failed before its first checkpoint"):
        main(args)
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == earlier
    assert not list(folder.glob(f"{REPLACED_PREFIX}*"))


def test_overwrite_restores_the_earlier_run_after_ctrl_c(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict
) -> None:
    folder = tmp_path / "ckpt" / "lenet"
    earlier = _earlier_run(folder, lenet_fitted)
    cfg = _small(shared_data)
    cfg["trainer"]["callbacks"].append(
        {"class_path": "kill_callback.FailAt", "init_args": {"kind": "interrupt"}}
    )
    proc = run_cli(tmp_path, "lenet", "fit", cfg, "--overwrite", "true", check=False)
    assert proc.returncode != 0
    assert "the earlier run's ['fitted.ckpt', 'last.ckpt'] are restored" in proc.stderr
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == earlier
    assert not list(folder.glob(f"{REPLACED_PREFIX}*"))


def test_overwrite_deletes_the_earlier_run_only_once_the_new_one_has_a_checkpoint(
    tmp_path: Path, shared_data: Path, lenet_fitted: dict, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt" / "lenet"
    earlier = _earlier_run(folder, lenet_fitted)
    args = ["fit", *_args(tmp_path, _small(shared_data)), "--experiment", "lenet"]
    with caplog.at_level(logging.INFO):
        main([*args, "--overwrite", "true"])
    log = caplog.text
    assert "--overwrite: moved the earlier run's ['fitted.ckpt', 'last.ckpt']" in log
    assert "the new run wrote its first checkpoint" in log
    assert not list(folder.glob(f"{REPLACED_PREFIX}*"))
    assert (folder / "last.ckpt").read_bytes() != earlier["last.ckpt"]
    assert not (folder / "fitted.ckpt").exists()  # fit writes last.ckpt; test writes fitted


def test_a_refused_argument_is_the_last_line_printed(tmp_path: Path, shared_data: Path) -> None:
    """Probe 21: the project's own message, not jsonargparse's Union dump, ends the output."""
    cmd = [sys.executable, "-m", "lightning_ood", "fit", *_args(tmp_path, _small(shared_data))]
    cmd += ["--data.init_args.val_size", "-5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "lightning-ood fit: num_workers and val_size must be >= 0, got 0 and -5"
    assert "Does not validate against any of the Union subtypes" not in proc.stderr
