"""Run folders: where an experiment writes, and replacing an earlier run without losing it.

``--experiment NAME`` names ``<checkpoint_root>/NAME`` and ``<log_root>/NAME``. A name is a
relative path that stays below both roots (:func:`run_folder`): absolute paths, empty names and
``..`` components are refused, nested names such as ``bench/lenet_seed1`` are fine.

``fit --overwrite true`` never deletes the earlier run before the new one exists:
:func:`move_aside` moves its checkpoints into a hidden ``.replaced-<time>`` folder beside them,
and :class:`ReplacedRunGuard` deletes that folder once the new run has written its first
checkpoint, or moves the files back if the run fails (an exception, Ctrl-C) before then. A
process killed outright leaves the folder in place, so the old run can still be recovered by
hand.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

#: Prefix of the hidden folder that holds a replaced run until the new run has a checkpoint.
REPLACED_PREFIX = ".replaced-"


def check_experiment(name: Any, flag: str = "--experiment") -> str:
    """``name`` if it is a relative path below its roots, else a ``ValueError`` with the fix.

    Refused: empty names, absolute paths (``/x``, ``C:\\x``, ``~/x``), and any ``.``/``..``
    component, each of which would write (or, with ``--overwrite``, delete) outside the
    project's ``checkpoint_root``/``log_root``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"{flag} {name!r}: an experiment name must be a non-empty relative path such as "
            "'lenet' or 'bench/lenet_seed1' (it names <checkpoint_root>/NAME and <log_root>/NAME)"
        )
    parts = PurePosixPath(name.replace("\\", "/")).parts
    absolute = (
        name.startswith(("/", "\\", "~"))
        or PureWindowsPath(name).is_absolute()
        or bool(PureWindowsPath(name).drive)
    )
    if absolute or any(p in (".", "..") for p in name.replace("\\", "/").split("/")):
        raise ValueError(
            f"{flag} {name!r}: an experiment name is a relative path that stays inside "
            "--checkpoint_root and --log_root; absolute paths, '~' and '.'/'..' components are "
            "refused. To write elsewhere, set --checkpoint_root/--log_root to that folder and "
            "give a plain name (e.g. 'lenet' or 'bench/lenet_seed1')"
        )
    if any(not p.strip() for p in parts):
        raise ValueError(f"{flag} {name!r}: a component of the experiment name is blank")
    return name


def run_folder(root: str | os.PathLike[str], experiment: str, flag: str = "--experiment") -> Path:
    """``root/experiment`` after :func:`check_experiment`, checked again after resolving
    symlinks, so a name can never leave ``root``."""
    check_experiment(experiment, flag)
    base = Path(root)
    folder = base / experiment
    resolved, top = folder.resolve(), base.resolve()
    if resolved != top and top not in resolved.parents:
        raise ValueError(
            f"{flag} {experiment!r}: {folder} resolves to {resolved}, outside {top} (a symlink "
            "in the path); pick another experiment name"
        )
    return folder


def move_aside(folder: Path, names: list[str]) -> Path:
    """Move ``folder/<name>`` for each name into a new hidden ``.replaced-<time>`` folder in
    ``folder`` (same filesystem: renames, nothing copied) and return that folder."""
    backup = folder / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    backup.mkdir()
    for name in names:
        os.replace(folder / name, backup / name)
    return backup


def restore(backup: Path) -> list[str]:
    """Move the files of ``backup`` back into its parent (not over a newer file) and remove it
    if it is then empty; returns the names moved back."""
    folder = backup.parent
    back = []
    for path in sorted(backup.iterdir()):
        if not (folder / path.name).exists():
            os.replace(path, folder / path.name)
            back.append(path.name)
    if not any(backup.iterdir()):
        backup.rmdir()
    return back


class ReplacedRunGuard(Callback):
    """Deletes a run moved aside by :func:`move_aside` once the new run has written a
    checkpoint into ``folder``; restores it when the run ends without one.

    Checks after every training batch and epoch (``ModelCheckpoint`` writes in those hooks,
    before this callback's next call) and at the end of the run, so the old files are gone at
    most one step after the first new checkpoint exists.
    """

    def __init__(self, folder: Path, backup: Path, replaced: list[str]) -> None:
        self.folder, self.backup, self.replaced = Path(folder), Path(backup), list(replaced)
        self.done = False

    def _new_checkpoint(self) -> bool:
        return any(self.folder.glob("*.ckpt"))

    def _settle(self, failed: bool) -> None:
        if self.done or not self.backup.exists():
            self.done = True
            return
        if self._new_checkpoint():
            shutil.rmtree(self.backup)
            self.done = True
            rank_zero_info(
                f"[lightning_ood] --overwrite: the new run wrote its first checkpoint; the "
                f"replaced run's {self.replaced} are deleted"
            )
        elif failed:
            back = restore(self.backup)
            self.done = True
            rank_zero_warn(
                f"[lightning_ood] --overwrite: the run stopped before writing a checkpoint; "
                f"the earlier run's {back} are restored in {self.folder}"
            )

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._settle(failed=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._settle(failed=False)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._settle(failed=False)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._settle(failed=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the end of fit, normal or not: a run that wrote nothing gives the old one back
        self._settle(failed=True)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._settle(failed=True)


__all__ = [
    "REPLACED_PREFIX",
    "ReplacedRunGuard",
    "check_experiment",
    "move_aside",
    "restore",
    "run_folder",
]
