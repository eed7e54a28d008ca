"""OOD evaluation metrics: exact functional core and torchmetrics ``Metric`` classes.

``functional`` holds the float64 metric functions (CCR@FPR included), ``modular`` the
``Metric`` classes that accumulate scores (and sync them under DDP) before calling them,
``groups`` the per-group (near/far OOD) averages of per-set results. Each module's ``__all__``
is the single list of its public names; this package re-exports all three.
"""

from lightning_ood.metrics import functional, groups, modular
from lightning_ood.metrics.functional import *  # noqa: F403
from lightning_ood.metrics.groups import *  # noqa: F403
from lightning_ood.metrics.modular import *  # noqa: F403

# Extended with each module's own list, a form static checkers (pyright, ruff) follow.
__all__: list[str] = []
__all__ += functional.__all__
__all__ += modular.__all__
__all__ += groups.__all__
