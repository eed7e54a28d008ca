"""Files: checkpoints read without executing code from them, every write atomic, bounded downloads.

Pure torch (no Lightning import), so models, detectors and the hand-off loader can use it.

* :func:`safe_load` is the one way this project reads a checkpoint (Lightning ``.ckpt``,
  reference ``.pth.tar``, feature-cache entries): ``torch.load(weights_only=True)``, which
  unpickles only tensors and primitive containers. A file that needs anything else (a pickled
  class, a ``__reduce__`` payload) is refused before any of its code runs.
* :func:`atomic_save` / :func:`atomic_write_text` write to a temporary file in the target's
  folder, fsync it and rename it over the target: a run killed mid-write leaves the previous
  good file in place, never a prefix.
* :func:`download_timeout` bounds every network fetch (datasets, torchvision weights), so a
  blocked network fails fast instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

#: Socket timeout (seconds) of every download lightning-ood starts.
DOWNLOAD_TIMEOUT_S = 20.0


class CheckpointError(RuntimeError):
    """A checkpoint file is missing pieces, truncated or corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled Python objects, which are never executed."""


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file needs arbitrary unpickling (code execution) to load.
        CheckpointError: the file is truncated, corrupt, or not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower() or "unsupported global" in str(err):
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} stores Python objects besides tensors and primitive "
                "types; it was NOT loaded, because unpickling them could run code from the file. "
                "Ask its author for a weights-only checkpoint (a state_dict, or a lightning-ood "
                f".ckpt). Details: {_first_line(err)}"
            ) from err
        raise CheckpointError(_corrupt_message(path, err)) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(_corrupt_message(path, err)) from err


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    unsafe = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln]
    return (unsafe or lines or [type(err).__name__])[0]


def _corrupt_message(path: Path, err: BaseException) -> str:
    size = path.stat().st_size
    return (
        f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt and cannot be read "
        f"({type(err).__name__}: {_first_line(err)}). If a run was killed while copying it, "
        "copy it again; lightning-ood itself never leaves a partly written checkpoint."
    )


def _atomic_write(path: Path, write: Callable[[IO[Any]], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results and checkpoints are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a hidden temporary file beside ``path``, fsync, then rename.

    The rename is atomic on POSIX filesystems, so readers see the old file or the new one,
    never a prefix. Stale temporaries of ``path`` (from a process killed mid-write) are
    removed after a successful save.
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` like :func:`atomic_save`: no reader ever sees a half-written file."""
    _atomic_write(Path(path), lambda f: f.write(text), "w")


@contextlib.contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Set the default socket timeout for the duration (torch.hub and torchvision's
    ``urlopen`` set none themselves), restoring the previous value afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
