"""Shared helper: write one benchmark result as JSON + Markdown with its provenance.

Every result records the exact command that regenerates it, the git commit (and whether the
working tree was dirty), CPU and GPU details, torch version/threads, wall time, and the load
average at start and end (this 2-core machine is shared with other processes; a load above
~0.5 at start means timings may be inflated).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception as err:  # pragma: no cover - no git
        return f"unavailable ({err})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_info() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none (no GPU on this machine; CUDA not available)"


def loadavg() -> list[float]:
    try:
        return [float(x) for x in os.getloadavg()]
    except OSError:
        return []


class Recorder:
    """Start it at the top of a benchmark; call :meth:`write` with the results at the end."""

    def __init__(self, name: str, argv: list[str] | None = None) -> None:
        self.name = name
        argv = sys.argv if argv is None else argv
        script = os.path.relpath(Path(argv[0]).resolve(), ROOT)
        niceness = os.nice(0)
        prefix = f"nice -n {niceness} " if niceness > 0 else ""
        self.command = prefix + ".venv/bin/python " + shlex.join([script, *argv[1:]])
        self.t0 = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.load_start = loadavg()
        self.commit = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        self.dirty = bool(dirty) and not dirty.startswith("unavailable")

    def environment(self) -> dict[str, Any]:
        return {
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "gpu": gpu_info(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }

    def provenance(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "git_commit": self.commit,
            "git_dirty_tracked_files": self.dirty,
            "started": self.started,
            "wall_time_s": round(time.perf_counter() - self.t0, 2),
            "loadavg_start_1_5_15": self.load_start,
            "loadavg_end_1_5_15": loadavg(),
            "environment": self.environment(),
            "note": "load average counts this benchmark's own threads too; a start load well "
            "above 0.5 on this 2-core machine means other processes competed for the CPU",
        }

    def write(
        self, results: dict[str, Any], markdown_body: str, out_dir: Path | None = None
    ) -> Path:
        """Write ``<out_dir>/<name>.json`` and ``.md`` atomically; returns the JSON path."""
        out_dir = out_dir or RESULTS
        out_dir.mkdir(parents=True, exist_ok=True)
        prov = self.provenance()
        payload = {"name": self.name, "provenance": prov, "results": results}
        env = prov["environment"]
        header = [
            f"# {self.name}",
            "",
            f"- command: `{prov['command']}`",
            f"- git commit: `{prov['git_commit']}`"
            + (" (tracked files modified at run time)" if prov["git_dirty_tracked_files"] else ""),
            f"- CPU: {env['cpu']} ({env['cpu_count']} logical cores, torch threads "
            f"{env['torch_threads']}); GPU: {env['gpu']}",
            f"- torch {env['torch']}, Python {env['python']}",
            f"- started {prov['started']}, wall time {prov['wall_time_s']:.1f} s",
            f"- load average (1/5/15 min) at start {prov['loadavg_start_1_5_15']}, at end "
            f"{prov['loadavg_end_1_5_15']} (includes this run's own threads)",
            "",
        ]
        md = "\n".join(header) + markdown_body.rstrip() + "\n"
        for suffix, text in ((".json", json.dumps(payload, indent=2, default=str)), (".md", md)):
            path = out_dir / f"{self.name}{suffix}"
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text + ("\n" if not text.endswith("\n") else ""))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        print(f"wrote {out_dir / self.name}.json and .md")
        return out_dir / f"{self.name}.json"


def pct(v: float) -> str:
    return "nan" if v != v else f"{100 * v:.2f}"
