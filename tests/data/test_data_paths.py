"""Default data root resolution and the guarded download."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.error import URLError

import pytest

from lightning_ood.data import DATA_ROOT_ENV, default_data_root
from lightning_ood.data import paths as paths_mod
from lightning_ood.data.paths import guarded_download, resolve_root
from lightning_ood.io import DOWNLOAD_TIMEOUT_S


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)


def test_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    assert default_data_root() == (tmp_path / "elsewhere").resolve()
    # An explicitly chosen location never downloads by default.
    assert resolve_root(None, None) == ((tmp_path / "elsewhere").resolve(), False)


def test_cwd_shared_data_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()


def test_package_location_second(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shared_data: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    assert default_data_root() == shared_data
    assert resolve_root(None, None) == (shared_data, False)


def test_fallback_to_local_data_enables_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths_mod, "_package_data_root", lambda: tmp_path / "nope")
    assert default_data_root() == tmp_path / "data"
    assert resolve_root(None, None) == (tmp_path / "data", True)
    assert resolve_root(None, False) == (tmp_path / "data", False)
    # An explicit root: download only when asked for.
    assert resolve_root(str(tmp_path / "x"), None) == ((tmp_path / "x").resolve(), False)
    assert resolve_root(str(tmp_path / "x"), True)[1] is True


def test_guarded_download_wraps_errors_and_sets_timeout(tmp_path: Path) -> None:
    seen: list[float | None] = []
    before = socket.getdefaulttimeout()

    def fetch() -> None:
        seen.append(socket.getdefaulttimeout())
        raise URLError("Name or service not known")

    with pytest.raises(RuntimeError, match=r"could not download FashionMNIST into .*set download"):
        guarded_download("FashionMNIST", tmp_path / "root", fetch)
    assert seen == [DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before
    with pytest.raises(RuntimeError) as exc:
        guarded_download("X", tmp_path / "root", fetch)
    assert str(tmp_path / "root") in str(exc.value)
    assert isinstance(exc.value.__cause__, URLError)
