"""Every benchmark script runs end to end: its ``--quick`` mode, as a user starts it.

The scripts are discovered (every ``benchmarks/*.py`` but the shared ``common`` module), so a
new script is covered by being added. The fast test reads each script's source: it must use the
shared parser of ``benchmarks/common.py`` (hence ``--quick``/``--out``), define ``main(argv)``,
and never edit ``sys.path``. The slow test runs ``python -m benchmarks.<name> --quick --out
TMP`` in a subprocess from the checkout and checks what it wrote: the record (``name``,
``provenance`` with the exact command, ``results``), the result keys each script promises, and
that every AUROC-like number in it is a fraction.

    .venv/bin/pytest -m slow -k quick tests/benchmarks
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).absolute().parents[2]
BENCHMARKS = ROOT / "benchmarks"
#: Modules of the package that are not benchmark scripts.
SHARED = {"__init__", "common"}
#: Per script: the record stems ``--quick`` writes and the keys of their ``results``.
EXPECTED: dict[str, dict[str, list[str]]] = {
    "all_detectors_densenet": {"all_detectors_densenet": ["default", "tuned", "odin_slice"]},
    "densenet_cpu_throughput": {"densenet_cpu_throughput": ["images_per_s"]},
    "every_detector": {"every_detector": ["parts"]},
    "fssd_corruption": {
        "fssd_corruption_shift": ["lenet", "lenet_summary"],
        "fssd_robustness": ["lenet", "lenet_gaussian_noise_summary"],
    },
    "fssd_fashionmnist": {"fssd_fashionmnist": ["per_seed", "aggregate", "targets"]},
    "fssd_multi_model": {"fssd_multi_model_e1": ["runs", "networks"]},
    "fssd_odin_gap": {"fssd_odin_gap": ["runs", "oracle_best"]},
    "fssd_table2": {"fssd_table2_e1": ["runs"]},
    "handoff_probe": {"handoff_probe": ["detectors"]},
    "imagenet_scale": {"imagenet_scale_12000": ["generate", "fit", "knn", "targets"]},
    "line_densenet_cifar10": {"line_densenet_cifar10": ["metrics", "ordering"]},
    "line_grid_cifar10": {"line_grid_cifar10": ["selected", "test"]},
    "line_intgrad": {"line_intgrad": ["metrics", "fit_seconds", "neuron_overlap"]},
    "peer_end_to_end": {"peer_end_to_end": ["median", "auroc_fashionmnist_vs_mnist"]},
    "peer_speed": {"peer_speed": ["rows", "all_fits"]},
    "react_exact_percentile": {"react_exact_percentile": ["exact", "rows"]},
    "regression_snapshot": {"regression_snapshot": ["values"]},
    "serve_throughput": {"serve_throughput": ["levels", "answers_checked"]},
    "shipped_combiners": {"shipped_combiners": ["rows"]},
    "speed": {f"speed_{item}": [] for item in "abcde"},
    "train_lenets": {"train_lenets_e1": ["seconds", "checkpoints"]},
    "zoo_throughput": {"zoo_throughput": []},
}
#: Keys whose numbers are fractions in [0, 1] wherever they appear in a result.
FRACTIONS = {"auroc", "aupr_in", "aupr_out", "fpr95", "fpr80"}


def scripts() -> list[str]:
    """Every benchmark script of the package, by module name."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in SHARED)


def test_scripts_follow_the_convention() -> None:
    """Each script uses ``parser``/``parse`` of ``benchmarks.common`` (the shared
    ``--quick --out --data_root --device --seed`` options), has ``main(argv)`` and a
    ``__main__`` guard, and never touches ``sys.path``; no shell script is left untested."""
    assert scripts(), f"no benchmark scripts found in {BENCHMARKS}"
    for name in scripts():
        source = (BENCHMARKS / f"{name}.py").read_text()
        tree = ast.parse(source)
        common = {  # from benchmarks.common import parser, parse
            a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks.common"
            for a in node.names
        }
        common |= {  # from benchmarks import common; common.parser(...)
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "common"
        }
        assert {"parser", "parse"} <= common, (
            f"benchmarks/{name}.py must build its options with benchmarks.common.parser/parse "
            f"(they give --quick and --out); it imports {sorted(common)} from benchmarks.common"
        )
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains and mains[0].args.args and mains[0].args.args[0].arg == "argv", (
            f"benchmarks/{name}.py needs `def main(argv: list[str] | None = None)`"
        )
        assert 'if __name__ == "__main__":' in source, f"benchmarks/{name}.py: no __main__ guard"
        assert "sys.path" not in source, f"benchmarks/{name}.py edits sys.path; import instead"
        assert name in EXPECTED, (
            f"benchmarks/{name}.py: add the record stems and result keys its --quick run "
            "writes to EXPECTED in tests/benchmarks/test_quick.py"
        )
    shells = sorted(p.name for p in BENCHMARKS.glob("*.sh"))
    assert not shells, f"shell scripts {shells}: write them as Python modules with --quick"


def _numbers_under(obj: Any, key: str | None = None) -> list[tuple[str, float]]:
    """Every ``(key, number)`` of a JSON tree whose key is one of :data:`FRACTIONS`."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _numbers_under(v, str(k))]
    if isinstance(obj, list):
        return [kv for v in obj for kv in _numbers_under(v, key)]
    if key in FRACTIONS and isinstance(obj, int | float) and not isinstance(obj, bool):
        return [(key, float(obj))]
    return []


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", scripts())
def test_quick(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1700)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{' '.join(cmd[1:])} exited {proc.returncode}:\n{log}"
    for stem, keys in EXPECTED[name].items():
        path = out / f"{stem}.json"
        assert path.is_file(), f"{name} --quick wrote no {path.name}: {sorted(out.iterdir())}"
        assert (out / f"{stem}.md").is_file()
        record = json.loads(path.read_text())
        assert record["name"] == stem
        command = record["provenance"]["command"]
        assert command.endswith(f"-m benchmarks.{name} --quick --out {out}"), command
        results = record["results"]
        assert isinstance(results, dict) and results, f"{path}: empty results"
        missing = [k for k in keys if k not in results]
        assert not missing, f"{path}: results lack {missing}; it has {sorted(results)}"
        bad = [(k, v) for k, v in _numbers_under(results) if not (0 <= v <= 1 or math.isnan(v))]
        assert not bad, f"{path}: fractions outside [0, 1]: {bad[:5]}"
