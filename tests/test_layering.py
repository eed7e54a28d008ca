"""The layering promise: models, detectors, the engine, the evaluation session (with the grid
and the paper analyses it runs) and the hand-off load no Lightning, and no library module
imports the command line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ood"

#: Pure-torch modules: importing any of them must not load `lightning`/`pytorch_lightning`.
PURE = [
    "lightning_ood",
    "lightning_ood.models",
    "lightning_ood.detectors",
    "lightning_ood.engine",
    "lightning_ood.protocol",
    "lightning_ood.tuning",
    "lightning_ood.session",
    "lightning_ood.analyses.line",
    "lightning_ood.analyses.fssd",
    "lightning_ood.grid",
    "lightning_ood.report",
    "lightning_ood.state",
    "lightning_ood.io",
    "lightning_ood.splits",
    "lightning_ood.features",
    "lightning_ood.metrics",
    "lightning_ood.predictor",
    "lightning_ood.distributed",
]


def _lightning_modules_after(code: str) -> list[str]:
    script = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'pytorch_lightning'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pure_modules_load_no_lightning() -> None:
    """One fresh interpreter imports them in turn and names the first that pulls it in."""
    code = (
        "import importlib, sys\n"
        "for m in " + repr(PURE) + ":\n"
        "    importlib.import_module(m)\n"
        "    if any(k.split('.')[0] in ('lightning', 'pytorch_lightning') for k in sys.modules):\n"
        "        raise SystemExit(f'{m} loads Lightning')\n"
    )
    assert _lightning_modules_after(code) == []


def test_handoff_load_runs_without_lightning(lenet_fitted: dict) -> None:
    code = (
        "import torch, lightning_ood\n"
        f"m = lightning_ood.load({str(lenet_fitted['ckpt'])!r})\n"
        "out = m(torch.rand(2, 1, 28, 28))\n"
        "assert sorted(out['scores']) == sorted(m.detector_names) and len(m.detector_names) == 8"
    )
    assert _lightning_modules_after(code) == []


def test_library_modules_never_import_the_cli() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if any(n == "lightning_ood.cli" for n in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []
