"""A callback that SIGKILLs its own process at a given step: a real, un-catchable crash."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FailAt(Callback):
    """Stops the run at the start of training, before any checkpoint: an error (a typo found
    late, out of memory) or a Ctrl-C (``KeyboardInterrupt``, which Lightning handles)."""

    def __init__(self, kind: str = "error") -> None:
        self.kind = kind

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.kind == "interrupt":
            raise KeyboardInterrupt
        raise RuntimeError("FailAt: the run failed before its first checkpoint")
