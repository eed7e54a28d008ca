"""Shared helper: one ``lightning-ood test`` run from a generated config, reused when unchanged.

The FSSD benchmarks (Table 2, multi-model, corruption shift and robustness, ODIN's gap) run
every evaluation through the CLI, as a user would, with configs they generate. A run is
reused when its config, checkpoint path and the size and mtime of every checkpoint file it
reads are unchanged and its results exist, so regenerating a table after a crash or a change
of one cell reruns only what changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stamps(cfg: Any, ckpt: Path | None) -> str:
    """Size and mtime of every checkpoint file the run reads (``--ckpt_path`` and any path in
    the config, e.g. DE members): a member retrained or still training under the same path
    changes the key, so a stale run is never reused."""
    paths: list[str] = [] if ckpt is None else [str(ckpt)]

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and x.endswith((".ckpt", ".pth", ".pt", ".tar")):
            paths.append(x)

    walk(cfg)
    lines = []
    for p in dict.fromkeys(paths):
        f = ROOT / p
        st = f.stat() if f.is_file() else None
        lines.append(
            f"# {p}: " + (f"{st.st_size} bytes, mtime_ns {st.st_mtime_ns}" if st else "missing")
        )
    return "".join(line + "\n" for line in lines)


def paper_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rows the papers' tables report: a layer ensemble's per-set-combiner row
    (``<name>[per-set]``: a combiner fitted on a hold-out of each test set, as the FSSD and
    Mahalanobis papers do) under its detector's name; every other detector's row as it is.
    Runs written before the rows were split hold only the per-set row, under the name."""
    from lightning_ood.protocol import PER_SET, per_set_row

    return {
        name: metrics.get(per_set_row(name), rows)
        for name, rows in metrics.items()
        if not name.endswith(PER_SET)
    }


def run_test(
    tag: str,
    cfg: dict[str, Any],
    out: Path,
    ckpt: Path | None = None,
    threads: int | None = None,
    prefix: str = "hA",
) -> dict[str, Any]:
    """Run ``lightning-ood test`` on ``cfg`` (its first callback must be ``OODEvaluation``)
    and return its ``ood_results.json``.

    Args:
        tag: run name: ``out/tag.yaml`` (config), ``out/tag.log``, ``out/tag/`` (results).
        cfg: the full CLI config; not modified.
        out: folder of the runs.
        ckpt: ``--ckpt_path``; part of the reuse key (the same config on other weights is
            another run).
        threads: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` of the run; ``None`` inherits.
        prefix: experiment name prefix (``<prefix>_<tag>``) under ``out/ckpt`` and ``out/logs``.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    cfg["trainer"]["callbacks"][0]["init_args"]["results_dir"] = str(out / tag)
    path = out / f"{tag}.yaml"
    text = yaml.safe_dump(cfg) + f"# ckpt_path: {ckpt}\n" + _stamps(cfg, ckpt)
    done = out / tag / "ood_results.json"
    if done.exists() and path.exists() and path.read_text() == text:  # same run: reuse
        return json.loads(done.read_text())
    path.write_text(text)
    cmd = [
        str(ROOT / ".venv/bin/lightning-ood"), "test", "--config", str(path),
        "--experiment", f"{prefix}_{tag}",
        "--checkpoint_root", str(out / "ckpt"), "--log_root", str(out / "logs"),
    ]  # fmt: skip
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    (out / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        path.unlink(missing_ok=True)  # never reuse a failed run
        raise RuntimeError(
            f"{tag}: lightning-ood test exited {proc.returncode}; see {out}/{tag}.log"
        )
    return json.loads(done.read_text())


def epoch_defaults(ns: argparse.Namespace, run_dir: str, stem: str) -> str:
    """Fill ``ns.out`` (default ``run_dir``) and return the result stem (``ns.name``, default
    ``stem``), both with ``_e<E>`` for LeNets of other than 3 epochs (the 3-epoch runs came
    first), so that runs on other networks never overwrite them."""
    suffix = "" if ns.epochs == 3 else f"_e{ns.epochs}"
    ns.out = ns.out or run_dir + suffix
    return ns.name or stem + suffix
