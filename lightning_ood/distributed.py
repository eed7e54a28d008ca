"""Who ends the default ``torch.distributed`` process group a run used, and when.

Lightning's DDP strategies create the default process group in ``setup_environment`` when none
exists, and never destroy a gloo group (only NCCL's, at interpreter exit). A gloo group left
alive until the interpreter finalises can kill a process whose run succeeded: the group's
worker threads still hold finished work (tensors) whose release needs the GIL while Python is
being torn down, and the process aborts with ``terminate called without an active exception``
(SIGABRT). Seen in about 1 of 6 two-rank ``ddp_spawn`` test runs here, and in 12 of 65 bare
two-process gloo runs (torch 2.14, ``mp.start_processes``, a few collectives each) that end
without ``destroy_process_group``; 0 of 65 with it (pytorch/pytorch#179291 describes the
mechanism). Destroying the group while the interpreter is alive joins those threads cleanly.

The library ends only a group it can tell is the run's: one that did not exist when the
evaluation was configured (:class:`~lightning_ood.callbacks.OODEvaluation` was created), so
Lightning created it for this run, in the process that launched it or in a process it started.
A group the user initialised before that is the user's, and stays. Lightning itself keeps its
group across ``fit``/``validate``/``test`` calls of one Trainer; after a release, the next call
simply creates a new one.

Pure torch: the caller passes its strategy's barrier (it knows the device NCCL needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist


def process_group_exists() -> bool:
    """Whether this process has a default ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class ProcessGroupOwnership:
    """Whether the default process group predates the run, observed when it is configured.

    Pickled with its owner, so a ``ddp_spawn`` worker applies the launching process's
    observation: a group that the worker finds was created by Lightning for the run.
    """

    preexisting: bool

    @classmethod
    def observe(cls) -> ProcessGroupOwnership:
        """Record now (before any run) whether a default process group exists."""
        return cls(preexisting=process_group_exists())

    def release(self, barrier: Callable[[], None] | None = None) -> bool:
        """Destroy the default process group if the run created it; return whether it did.

        ``barrier`` runs first, so that no rank closes its connections while another is still
        inside a collective. A group that existed when this was observed is left alone.
        """
        if self.preexisting or not process_group_exists():
            return False
        if barrier is not None:
            barrier()
        dist.destroy_process_group()
        return True
