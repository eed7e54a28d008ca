"""The package installs beyond the checkout: a wheel carries its configs and its version, and
``lightning-ood`` finds a packaged config by name."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import lightning_ood
from lightning_ood.cli import PACKAGED_CONFIGS, packaged_config, packaged_configs

ROOT = Path(__file__).resolve().parents[2]


def test_config_names_resolve_to_the_packaged_files(tmp_path: Path) -> None:
    demo = str(PACKAGED_CONFIGS / "demo.yaml")
    assert packaged_config("demo") == demo
    assert packaged_config("demo.yaml") == demo
    assert packaged_config("ood/svhn") == str(PACKAGED_CONFIGS / "ood" / "svhn.yaml")
    own = tmp_path / "demo"
    own.write_text("{}")
    assert packaged_config(str(own)) == str(own)  # an existing path is the user's file
    assert packaged_config("no_such_config") == "no_such_config"  # the parser reports it
    assert packaged_config("../pyproject") == "../pyproject"  # never outside the package
    argv = ["fit", "--config", "demo", "--config=ood/svhn", "--experiment", "demo"]
    assert packaged_configs(argv) == [
        "fit", "--config", demo, f"--config={PACKAGED_CONFIGS / 'ood' / 'svhn.yaml'}",
        "--experiment", "demo",
    ]  # fmt: skip


def test_the_version_is_written_once() -> None:
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    assert 'dynamic = ["version"]' in lines and not any(
        ln.startswith('version = "') for ln in lines
    )
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {lightning_ood.__version__}" in changelog


@pytest.mark.integration
def test_a_built_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    """Wheel and sdist from the repository; the wheel installed offline into a fresh venv
    (its dependencies from this environment's site-packages), run from an empty folder."""
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("lightning_ood-*.whl")
    (sdist,) = dist.glob("lightning_ood-*.tar.gz")
    assert lightning_ood.__version__ in wheel.name and lightning_ood.__version__ in sdist.name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # the dependencies come from this environment, read-only (offline: no index is asked)
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if p]
    Path(purelib, "_deps_from_test_env.pth").write_text("\n".join(deps) + "\n")
    install = [py, "-m", "pip", "install", "--no-index", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    exe = venv / "bin" / "lightning-ood"

    def run(*args: str) -> str:
        proc = subprocess.run(
            [str(exe), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    assert run("--version").strip() == f"lightning-ood {lightning_ood.__version__}"
    printed = run("fit", "--config", "demo", "--print_config")
    assert "model: lenet" in printed and "FashionMNISTDataModule" in printed
    where = subprocess.run(
        [py, "-c", "import lightning_ood; print(lightning_ood.__file__)"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert str(venv) in where  # the installed copy, not the checkout
    assert "--help" in run("--help") or "usage" in run("--help")


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_ood.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    # grid is a Trainer subcommand now: listed with fit/validate/test/predict and their
    # descriptions, no longer in the epilog's "more subcommands" (models:, serve:, ...)
    for sub in ("fit", "validate", "test", "predict", "grid Grid-search", "models:", "serve:",
                "--version"):  # fmt: skip
        assert sub in text, sub
