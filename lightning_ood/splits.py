"""The one seeded split of a dataset's indices: pure torch, the same on every process.

The datamodule's ``val_size`` hold-out, the OOD callback's combiner hold-out, the grid's
selection/report and fit/select splits and the benchmarks all draw their parts from
:func:`seeded_parts`, so the same ``(n, seed)`` always yields the same samples, whatever the
world size or the caller.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor


def seeded_permutation(n: int, seed: int) -> Tensor:
    """``torch.randperm(n)`` from a CPU generator seeded ``seed`` (int64, on the CPU)."""
    if n < 0:
        raise ValueError(f"seeded_permutation: n must be >= 0, got {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def seeded_parts(n: int, sizes: Sequence[int], seed: int, what: str = "dataset") -> list[Tensor]:
    """Consecutive parts of one seeded permutation of ``range(n)``: ``sizes`` then the rest.

    ``seeded_parts(n, [k], seed)`` is ``[first k, the other n - k]``. Every part, the rest
    included, must be non-empty; otherwise the error names ``what`` and the sizes.
    """
    if any(s < 1 for s in sizes) or sum(sizes) >= n:
        raise ValueError(
            f"{what} has {n} samples: cannot hold out parts of {list(sizes)} samples and keep "
            "at least one for the rest; lower the hold-out size or use more samples"
        )
    perm = seeded_permutation(n, seed)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + int(s))
    return [perm[a:b] for a, b in itertools.pairwise(bounds)] + [perm[bounds[-1] :]]


def fraction_size(n: int, fraction: float) -> int:
    """``round(fraction * n)``: the size of a part given as a fraction (Python rounding)."""
    return round(fraction * n)
