"""Files: checkpoints read without executing code from them, every write atomic, bounded downloads.

Pure torch (no Lightning import), so models, detectors and the hand-off loader can use it.

* :func:`safe_load` is the one way this project reads a checkpoint (Lightning ``.ckpt``,
  reference ``.pth.tar``; feature-cache entries are read with the same ``weights_only=True``
  load, memory-mapped): ``torch.load(weights_only=True)``, which
  unpickles only tensors and primitive containers. A file that needs anything else (a pickled
  class, a ``__reduce__`` payload) is refused before any of its code runs. Each other failure
  has its own error and remedy: not a checkpoint at all, truncated, or a device that is absent.
* :func:`atomic_save` / :func:`atomic_write_text` write to a temporary file in the target's
  folder, fsync it and rename it over the target: a run killed mid-write leaves the previous
  good file in place, never a prefix, and concurrent writers of one target all finish.
* :func:`download_timeout` bounds every network fetch (datasets, torchvision weights), so a
  blocked network fails fast instead of hanging.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pickle
import re
import socket
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

#: Socket timeout (seconds) of every download lightning-ood starts.
DOWNLOAD_TIMEOUT_S = 20.0


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the subclasses say why."""


class TruncatedCheckpointError(CheckpointError):
    """A torch checkpoint cut short or damaged (e.g. an interrupted copy): copy it again."""


class NotACheckpointError(CheckpointError):
    """The file is no torch checkpoint at all, or not the kind of checkpoint asked for."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled Python objects, which are never executed."""


class CheckpointDeviceError(CheckpointError):
    """A readable checkpoint was asked onto a device this machine does not have."""


#: First bytes of the formats ``torch.load`` reads: a ``torch.save`` zip archive, or the legacy
#: format (a pickle stream, protocol 2 to 5). Anything else is not a torch checkpoint.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
#: The legacy format opens with torch's magic number, pickled as a 10-byte LONG1.
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
#: Messages of torch's weights-only unpickler for objects it refuses to build (code could run).
_UNSAFE_MARKERS = (
    "GLOBAL",
    "unrecognized function",
    "Can only create new object",
    "Can only build",
)


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix.

    The failure is diagnosed before and after reading, so each cause gets its own remedy:
    a file of another kind, a truncated copy, pickled code, or a device this machine lacks.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointDeviceError: ``map_location`` names a device that is absent here (the file
            itself may be fine).
        NotACheckpointError: the file is not a torch checkpoint (text, random bytes, a plain
            pickle, a zip archive of something else).
        TruncatedCheckpointError: a torch checkpoint that is cut short or corrupt.
        UnsafeCheckpointError: the file needs arbitrary unpickling (code execution) to load.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    _check_device(path, map_location)
    _check_format(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if any(marker in str(err) for marker in _UNSAFE_MARKERS):
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} stores Python objects besides tensors and primitive "
                "types; it was NOT loaded, because unpickling them could run code from the file. "
                "Ask its author for a weights-only checkpoint (a state_dict, or a lightning-ood "
                f".ckpt). Details: {_first_line(err)}"
            ) from err
        raise TruncatedCheckpointError(_corrupt_message(path, err)) from err
    except RuntimeError as err:
        if _is_device_error(err):
            raise CheckpointDeviceError(_device_message(path, map_location, err)) from err
        raise TruncatedCheckpointError(_corrupt_message(path, err)) from err
    except Exception as err:  # a damaged file can fail anywhere inside the unpickler
        raise TruncatedCheckpointError(_corrupt_message(path, err)) from err
    _check_tensor_sizes(obj, path)
    return obj


def _check_tensor_sizes(obj: Any, path: Path, depth: int = 0) -> None:
    """Refuse tensors that claim more elements than their storage holds (a stride-0 or
    overlapping view): a few stored bytes would become gigabytes as soon as anything copies
    them (``empty_like``, ``clone``). ``torch.save`` of a real tensor never writes one."""
    if depth > 64:
        raise NotACheckpointError(f"checkpoint {str(path)!r} nests containers over 64 deep")
    if isinstance(obj, torch.Tensor):
        if obj.is_sparse or obj.layout != torch.strided or obj.numel() == 0:
            return
        dense = obj.numel() * obj.element_size()
        stored = obj.untyped_storage().nbytes()
        if dense > stored:
            raise NotACheckpointError(
                f"checkpoint {str(path)!r} holds a tensor of shape {tuple(obj.shape)} that "
                f"repeats {stored} stored bytes as {dense} (a stride-0 or overlapping view); "
                "lightning-ood never writes one, so the file is refused"
            )
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _check_tensor_sizes(v, path, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_tensor_sizes(v, path, depth + 1)


def _check_format(path: Path) -> None:
    """Refuse files that are no torch checkpoint before unpickling them, so random bytes are
    never reported as pickled code; a torch zip archive without its end record is truncated."""
    with open(path, "rb") as f:
        head = f.read(32)
    size = path.stat().st_size
    if not head:
        raise TruncatedCheckpointError(
            f"checkpoint {str(path)!r} is empty (0 bytes); if it was being copied or written "
            "when the process stopped, copy it again."
        )
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise TruncatedCheckpointError(
                f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt: it starts as a "
                "torch.save archive but its end is missing. If a run was killed while copying "
                "it, copy it again; lightning-ood itself never leaves a partly written checkpoint."
            )
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return
        what = "a zip archive without the data.pkl of a torch.save checkpoint"
    elif head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return  # torch's legacy (pre-1.6) format
    elif size == 0:
        what = "it reports a size of 0 but has content (a special file such as /proc/...)"
    elif tarfile.is_tarfile(path):
        return  # torch's oldest format
    elif head.startswith(b"\x80"):
        what = "a Python pickle that torch.save did not write"
    else:
        what = f"it starts with {head[:4]!r}, neither a torch.save archive nor a pickle"
    raise NotACheckpointError(
        f"{str(path)!r} ({size} bytes) is not a torch checkpoint: {what}. Check the path: a "
        "checkpoint is the .ckpt/.pt/.pth/.pth.tar file that torch.save or a lightning-ood run "
        "wrote."
    )


def _check_device(path: Path, map_location: Any) -> None:
    """A device that is absent here fails as such, before the file is blamed."""
    if not isinstance(map_location, str | torch.device):
        return  # a dict or callable: its errors are classified after reading
    try:
        device = torch.device(map_location)
    except (RuntimeError, ValueError) as err:
        raise CheckpointDeviceError(_device_message(path, map_location, err)) from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            why = f"this machine has {count} CUDA device(s)"
            raise CheckpointDeviceError(_device_message(path, map_location, why))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointDeviceError(_device_message(path, map_location, "MPS is not available"))


def _is_device_error(err: BaseException) -> bool:
    msg = str(err)
    return any(
        s in msg
        for s in ("deserialize object on", "device string", "torch.cuda.device_count", "CUDA")
    )


def _device_message(path: Path, map_location: Any, why: object) -> str:
    return (
        f"cannot load checkpoint {str(path)!r} onto map_location={map_location!r}: {why}. "
        "This is not a fault of the file: load it with map_location='cpu' (lightning_ood.load's "
        "default) and move the model with .to(device), or use a machine that has that device."
    )


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    unsafe = [ln for ln in lines if any(m in ln for m in (*_UNSAFE_MARKERS, "Unsupported"))]
    return (unsafe or lines or [type(err).__name__])[0]


def _corrupt_message(path: Path, err: BaseException) -> str:
    size = path.stat().st_size
    return (
        f"checkpoint {str(path)!r} ({size} bytes) is truncated or corrupt and cannot be read "
        f"({type(err).__name__}: {_first_line(err)}). If a run was killed while copying it, "
        "copy it again; lightning-ood itself never leaves a partly written checkpoint."
    )


#: A temporary of another writer is removed only when provably abandoned: its owner (recorded
#: in the name) was a process on this host that no longer runs, or, for a temporary whose
#: owner cannot be checked (another host on a shared filesystem, an older naming), when it was
#: last modified this long ago (seconds). A live writer keeps its file's mtime fresh.
STALE_TEMP_AGE_S = 6 * 3600.0
#: ``<host tag>-<pid>-`` after the target's name: who writes a temporary.
_TEMP_OWNER = re.compile(r"lood-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp")
#: Temporaries of lightning-ood versions that did not record their owner: ``mkstemp``'s
#: random part only.
_TEMP_LEGACY = re.compile(r"[A-Za-z0-9_]{8}\.tmp")


def _host_tag() -> str:
    """Eight hex digits naming this host (a hostname may hold characters a file name should not)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # e.g. a pid outside the platform's range: nothing to probe, keep the file
        return True
    return True


def _abandoned(tmp: Path, target: str, host: str, now: float) -> bool:
    """Whether ``tmp``, a temporary beside ``target``, was left by a writer that is gone."""
    rest = tmp.name[len(f".{target}.") :]
    owner = _TEMP_OWNER.fullmatch(rest)
    if owner is None and _TEMP_LEGACY.fullmatch(rest) is None:
        return False  # another target's temporary (".a.b.<...>.tmp" beside target "a")
    if owner is not None and owner["host"] == host:
        pid = int(owner["pid"])
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        return now - tmp.stat().st_mtime > STALE_TEMP_AGE_S
    except FileNotFoundError:  # its writer renamed or removed it meanwhile
        return False


def _remove_abandoned_temporaries(path: Path) -> None:
    """Delete the temporaries of ``path`` whose writers died mid-write, never a live one."""
    host, now = _host_tag(), time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if _abandoned(tmp, path.name, host, now):
            tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, write: Callable[[IO[Any]], None], mode: str) -> None:
    """Write through a temporary named after its owner, then rename it over ``path``.

    Concurrent writers of one target (two runs filling the same cache entry) each write their
    own temporary, and each rename is atomic: every reader sees one writer's complete file,
    the last rename wins, and neither writer touches the other's temporary.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.lood-{_host_tag()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
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
    _remove_abandoned_temporaries(path)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a hidden temporary file beside ``path``, fsync, then rename.

    The rename is atomic on POSIX filesystems, so readers see the old file or the new one,
    never a prefix. Temporaries of ``path`` left by a process killed mid-write are removed
    after a successful save; those of writers still running never are, so concurrent writers
    of one file all finish (the last rename wins).
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f), "wb")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` like :func:`atomic_save` (figures)."""
    _atomic_write(Path(path), lambda f: f.write(data), "wb")


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
