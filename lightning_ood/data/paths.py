"""Where the data lives, and the one guarded place that may download it.

Resolution order of the data root (``root: null`` in a config):

1. the environment variable ``LIGHTNING_OOD_DATA``;
2. ``../shared/data`` relative to the current working directory (the project layout);
3. ``../shared/data`` beside the project checkout (found from the package location);
4. ``./data``, the only case where downloading is enabled by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lightning_ood.io import download_timeout

#: Environment variable that overrides the default data root.
DATA_ROOT_ENV = "LIGHTNING_OOD_DATA"


def _cwd_data_root() -> Path:
    return Path.cwd() / ".." / "shared" / "data"


def _package_data_root() -> Path:
    # lightning_ood/data/paths.py -> parents[2] is the project checkout (holding lightning_ood/).
    return Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _fallback_data_root() -> Path:
    return Path.cwd() / "data"


def default_data_root() -> Path:
    """The data root used when a datamodule is given ``root=None`` (see module docstring)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (_cwd_data_root(), _package_data_root()):
        if candidate.is_dir():
            return candidate.resolve()
    return _fallback_data_root()


def resolve_root(root: str | os.PathLike[str] | None, download: bool | None) -> tuple[Path, bool]:
    """Resolve ``(root, download)`` as the datamodules do.

    ``download=None`` means: download only when no root was given and the default fell back to
    ``./data`` (a fresh machine without the shared data), never into a shared read-only folder.
    """
    if root is not None:
        path = Path(root).expanduser().resolve()
        return path, bool(download)
    path = default_data_root()
    if download is None:
        download = os.environ.get(DATA_ROOT_ENV) is None and path == _fallback_data_root()
    return path, download


def guarded_download(dataset: str, root: Path, fetch: Callable[[], object]) -> None:
    """Run ``fetch`` (a torchvision download) under :func:`lightning_ood.io.download_timeout`.

    Any failure (no network, timeout, checksum mismatch) becomes one clear ``RuntimeError``
    that names the dataset and the folder, so a run never hangs or dies in urllib internals.
    """
    with download_timeout():
        try:
            root.mkdir(parents=True, exist_ok=True)
            fetch()
        except Exception as err:
            raise RuntimeError(
                f"could not download {dataset} into {root} ({type(err).__name__}: {err}). Place "
                f"the files there by hand (the datamodule's docstring gives the layout) or point "
                f"--data.root at a folder that holds them, and set download: false."
            ) from err
