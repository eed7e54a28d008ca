"""SIGKILL mid-epoch, `fit --ckpt_path last`, and the final weights equal an uninterrupted run's."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest
import torch
from _cli import base_config, run_cli

from lightning_ood.io import safe_load

STEPS_PER_EPOCH = 32  # 2,000 images (train_every=30), batch 64


def _config(shared_data: Path) -> dict:
    cfg = base_config(shared_data)
    cfg["trainer"].update({"max_epochs": 2, "deterministic": True, "limit_val_batches": 2})
    # LeNet has dropout: the resumed run must continue the same random stream too
    cfg["model"]["lr_scheduler"] = {
        "class_path": "torch.optim.lr_scheduler.StepLR",
        "init_args": {"step_size": 1, "gamma": 0.7},
    }
    return cfg


@pytest.mark.integration  # ~35 s alone: two fits, one killed mid-epoch; CI runs it
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path: Path, shared_data: Path) -> None:
    cfg = _config(shared_data)
    every = ["--checkpoint_every_n_steps", "5"]
    run_cli(tmp_path, "straight", "fit", cfg, *every)

    killed = copy.deepcopy(cfg)
    killed["trainer"]["callbacks"] = [
        {"class_path": "kill_callback.KillAt", "init_args": {"step": 37}}
    ]
    proc = run_cli(tmp_path, "resumed", "fit", killed, *every, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    last = tmp_path / "ckpt" / "resumed" / "last.ckpt"
    saved = safe_load(last)
    assert saved["global_step"] == 35  # mid-epoch 2 (steps 33..64), written before the kill
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 35 - STEPS_PER_EPOCH, "batch_size": 64}
    ]
    assert list(last.parent.glob(".*.tmp")) == []

    proc = run_cli(tmp_path, "resumed", "fit", cfg, *every, "--ckpt_path", "last")
    assert "Restoring states from the checkpoint path" in proc.stderr + proc.stdout

    a = safe_load(tmp_path / "ckpt" / "straight" / "last.ckpt")
    b = safe_load(last)
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
