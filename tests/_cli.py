"""Helpers: run `lightning-ood` in a fresh process on a small FashionMNIST slice.

Importable from every test module (``tests/`` is on ``sys.path`` through its conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Test-only modules a CLI subprocess may load by class path (e.g. ``kill_callback``).
HELPERS = Path(__file__).resolve().parent / "reliability"

#: Every detector kind, as the session checkpoint (conftest ``lenet_fitted``) holds them: the
#: demo's hyperparameters.
LENET_DETECTORS: dict[str, dict[str, Any]] = {
    "msp": {},
    "odin": {"temperature": 1000.0, "epsilon": 0.0014},
    "energy": {},
    "react": {"percentile": 90.0},
    "dice": {"p": 90.0},
    "line": {"delta": 1.0, "p_a": 90, "p_w": 90},
    "mahalanobis": {"taps": ["conv1", "conv2", "fc1"]},
    "fssd": {"taps": ["conv1", "conv2", "fc1", "logits"], "noise": "reference"},
}


def base_config(data_root: Path, **data_args: Any) -> dict[str, Any]:
    """LeNet on FashionMNIST (the demo recipe), a few thousand images, quiet output."""
    return {
        "seed_everything": 1,
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 10,
        },
        "model": {
            "model": "lenet",
            "num_classes": 10,
            "model_kwargs": {"in_channels": 1},
            "optimizer": {"class_path": "torch.optim.Adadelta", "init_args": {"lr": 1.0}},
        },
        "data": {
            "class_path": "lightning_ood.data.FashionMNISTDataModule",
            "init_args": {
                "root": str(data_root),
                "batch_size": 64,
                "eval_batch_size": 250,
                "num_workers": 0,
                "train_every": 30,
                **data_args,
            },
        },
    }


def ood_callback(detectors: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {
        "class_path": "lightning_ood.callbacks.OODEvaluation",
        "init_args": {"progress": False, "detectors": detectors, **kw},
    }


def fit_then_test(
    tmp: Path, data_root: Path, experiment: str, detectors: dict[str, Any], *, val_size: int
) -> tuple[dict[str, Any], Any]:
    """`lightning-ood fit` of the demo LeNet on every 30th training image (no detectors), then
    `test` of its last checkpoint with ``detectors`` in the OOD callback, scored on every 20th
    FashionMNIST vs MNIST test image; both in this process on one thread (shared CPUs).

    Returns the callback's results and the test run's CLI (for fitted detector state)."""
    from lightning_ood.callbacks import evaluation as ood_evaluation
    from lightning_ood.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = base_config(data_root, train_every=30, test_every=20, ood_every=20,
                      ood_sets=["mnist"], val_size=val_size)  # fmt: skip
    common = ["--checkpoint_root", str(tmp / "ckpt"), "--log_root", str(tmp / "logs"),
              "--experiment", experiment]  # fmt: skip
    (tmp / "fit.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp / "fit.yaml"), *common])
    cfg["trainer"]["callbacks"] = [ood_callback(detectors, per_set_holdout=100, tune=None)]
    (tmp / "test.yaml").write_text(yaml.safe_dump(cfg))
    ckpt = tmp / "ckpt" / experiment / "last.ckpt"
    try:
        cli = main(["test", "--config", str(tmp / "test.yaml"), *common, "--ckpt_path", str(ckpt)])
    finally:
        torch.set_num_threads(threads)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ood_evaluation.OODEvaluation))
    return cb.results, cli


def run_cli(
    tmp: Path,
    name: str,
    subcommand: str,
    config: dict[str, Any],
    *extra: str,
    check: bool = True,
    entry: Sequence[str] = ("-m", "lightning_ood"),
) -> subprocess.CompletedProcess[str]:
    """``lightning-ood <subcommand>`` in a fresh interpreter (``entry``: what ``python`` runs,
    e.g. a script that wraps the CLI), config written to ``tmp``, checkpoints and logs under
    it; with ``check``, any exit status but 0 fails with the stderr tail."""
    cfg = tmp / f"{name}-{subcommand}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        *entry,
        subcommand,
        "--config",
        str(cfg),
        "--experiment",
        name,
        "--checkpoint_root",
        str(tmp / "ckpt"),
        "--log_root",
        str(tmp / "logs"),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(ROOT)])}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def scheduled_lrs(config: Path, epochs: list[int]) -> tuple[list[float], Any, Any]:
    """The learning rate of ``config``'s recipe at each of ``epochs`` (scheduler stepped once
    per epoch, no training), with the optimizer and the instantiated CLI."""
    from lightning_ood.cli import main

    cli = main(["--config", str(config)], run=False)
    conf = cli.model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    out, epoch = [], 0
    for target in epochs:
        while epoch < target:
            opt.step()
            sched.step()
            epoch += 1
        out.append(opt.param_groups[0]["lr"])
    return out, opt, cli
