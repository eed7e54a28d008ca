"""The detector registry: ``@register_detector``, ``list_detectors`` and third-party plugins
registered through the ``lightning_ood.detectors`` entry-point group (a real distribution,
installed with pip into a temporary target, imported by a fresh interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_ood.detectors import (
    DETECTORS,
    ENTRY_POINT_GROUP,
    Detector,
    Energy,
    build_detector,
    list_detectors,
    register_detector,
)
from lightning_ood.detectors.hparams import HParam, positive
from lightning_ood.models.base import BackboneOutput


def test_list_detectors_is_sorted_and_filters_like_a_shell_pattern() -> None:
    kinds = list_detectors()
    assert kinds == sorted(DETECTORS) and len(kinds) == len(DETECTORS) >= 24
    assert list_detectors("fssd*") == ["fssd", "fssd_ensemble"]
    assert list_detectors("mcd*") == ["mcd", "mcd_var"]
    assert list_detectors("no_such_*") == []
    assert DETECTORS["energy"] is Energy


def test_every_registered_class_is_registered_under_its_own_kind() -> None:
    for kind in list_detectors():
        cls = DETECTORS[kind]
        assert issubclass(cls, Detector) and cls.kind == kind
        assert DETECTORS.origin(kind) == cls.__module__


def test_a_second_class_under_a_taken_kind_is_refused_by_name() -> None:
    class Impostor(Detector):
        kind = "energy"

    with pytest.raises(ValueError, match=r"kind 'energy'.*already registered.*energy"):
        register_detector(Impostor)
    assert DETECTORS["energy"] is Energy
    with pytest.raises(TypeError, match="not a Detector subclass"):
        register_detector(int)  # type: ignore[arg-type]


def test_unknown_kind_names_the_entry_and_the_known_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown detector 'nope' \(config entry 'x'\).*energy"):
        build_detector("x", {"type": "nope"})
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("x", {"type": ["energy"]})


PLUGIN = '''
"""A third-party detector: the logit norm, scaled."""
import torch
from lightning_ood.detectors import Detector
from lightning_ood.detectors.hparams import HParam, positive


class LogitNorm(Detector):
    kind = "plugin_logit_norm"
    uses_training_data = False
    scale = HParam(1.0, positive(), search=(0.5, 2.0), stage="score", doc="factor")

    def score(self, out, model=None, inputs=None):
        return self.scale * out.logits.norm(dim=1)
'''

PYPROJECT = f"""
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "lood-plugin-demo"
version = "0.1.0"

[project.entry-points."{ENTRY_POINT_GROUP}"]
plugin_logit_norm = "lood_plugin_demo:LogitNorm"

[tool.setuptools]
packages = ["lood_plugin_demo"]
"""

CLIENT = """
import json, torch
from lightning_ood.detectors import DETECTORS, build_detector, list_detectors
from lightning_ood.models.base import BackboneOutput
det = build_detector("ln", {"type": "plugin_logit_norm", "scale": 2.0})
logits = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
out = BackboneOutput(features=torch.zeros(2, 1), logits=logits)
print(json.dumps({
    "listed": "plugin_logit_norm" in list_detectors("plugin_*"),
    "origin": DETECTORS.origin("plugin_logit_norm"),
    "config": det.config(),
    "space": {k: list(v) for k, v in type(det).search_space.items()},
    "scores": det.score(out).tolist(),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the plugin distribution (offline, no deps) into a target directory."""
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "lood_plugin_demo").mkdir(parents=True)
    (src / "lood_plugin_demo" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(site), str(src)],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert list(site.glob("lood_plugin_demo-0.1.0.dist-info/entry_points.txt"))
    return site


def _variant(installed: Path, tmp_path: Path, module: str) -> Path:
    """The installed distribution with its module's source replaced (a broken release)."""
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    (site / "lood_plugin_demo" / "__init__.py").write_text(textwrap.dedent(module))
    return site


def _run(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_an_installed_plugin_distribution_registers_its_detector(installed: Path) -> None:
    proc = _run(installed, CLIENT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["listed"] is True
    assert "lood-plugin-demo" in got["origin"] and "plugin_logit_norm" in got["origin"]
    assert got["config"] == {"type": "plugin_logit_norm", "scale": 2.0, "name": "ln"}
    assert got["space"] == {"scale": [1.0, 0.5, 2.0]}  # the default joins the declared sweep
    assert got["scores"] == pytest.approx([2.0 * 5.0, 2.0 * 1.0])
    # without the distribution on the path the kind is unknown, with the known kinds listed
    bare = subprocess.run(
        [sys.executable, "-c", CLIENT], capture_output=True, text=True, timeout=120
    )
    assert bare.returncode != 0 and "unknown detector 'plugin_logit_norm'" in bare.stderr


def test_a_broken_plugin_is_reported_with_its_distribution(installed: Path, tmp_path: Path) -> None:
    site = _variant(installed, tmp_path, "raise RuntimeError('boom at import')\n")
    proc = _run(site, "from lightning_ood.detectors import list_detectors; list_detectors()")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not load detector plugin" in last and "'lood-plugin-demo'" in last
    assert "boom at import" in last and "fix or uninstall" in last


def test_a_plugin_cannot_take_a_built_in_kind(installed: Path, tmp_path: Path) -> None:
    site = _variant(installed, tmp_path, PLUGIN.replace('"plugin_logit_norm"', '"energy"'))
    proc = _run(site, "from lightning_ood.detectors import list_detectors; list_detectors()")
    assert proc.returncode != 0
    assert "detector kind 'energy'" in proc.stderr and "already registered" in proc.stderr


class _Scaled(Detector):
    """Declared hyperparameters, not registered: the derivations alone."""

    kind = "test_scaled"
    uses_training_data = False
    factor = HParam(1.0, positive(), search=(2.0, 3.0), stage="score", doc="f")

    def score(self, out: BackboneOutput, model: object = None, inputs: object = None):
        return self.factor * out.logits.max(dim=1).values


def test_declarations_give_signature_config_space_and_validation() -> None:
    import inspect

    assert str(inspect.signature(_Scaled)) == "(*, factor=1.0, name=None)"
    assert _Scaled.search_space == {"factor": (1.0, 2.0, 3.0)}
    assert _Scaled.finalize_only == {"factor"}
    det = _Scaled(factor=2.5)
    assert det.config() == {"type": "test_scaled", "factor": 2.5, "name": "test_scaled"}
    with pytest.raises(ValueError, match=r"_Scaled: hyperparameter factor=-1 is out of range"):
        _Scaled(factor=-1)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['fator'\]"):
        _Scaled(fator=2.0)
    out = BackboneOutput(features=torch.zeros(1, 1), logits=torch.tensor([[1.0, 3.0]]))
    assert det.score(out).tolist() == [7.5]
