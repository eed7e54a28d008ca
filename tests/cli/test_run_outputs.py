"""What a run writes stays under its roots, whatever the working directory (a run without a
logger used to save its ``config.yaml`` into the directory it was started from)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from _cli import ROOT, base_config


def test_a_run_without_logger_saves_its_config_under_log_root(
    tmp_path: Path, shared_data: Path
) -> None:
    cfg = base_config(shared_data)
    cfg["trainer"].update({"logger": False, "max_steps": 2, "limit_val_batches": 0})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightning_ood", "fit", "--config", str(tmp_path / "run.yaml")]
    cmd += ["--experiment", "quiet", "--checkpoint_root", str(tmp_path / "ckpt")]
    cmd += ["--log_root", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    saved = yaml.safe_load((tmp_path / "logs" / "quiet" / "config.yaml").read_text())
    assert saved["trainer"]["logger"] is False and saved["trainer"]["max_steps"] == 2
    assert (tmp_path / "ckpt" / "quiet" / "last.ckpt").is_file()
