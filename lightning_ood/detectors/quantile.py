"""Exact percentiles of a stream of values in bounded memory (ReAct's clipping threshold).

ReAct (Sun et al. 2021, eq. 3 and §4) clips at the p-th percentile of *all* training
activations. At ImageNet scale that is 1.28 M × 2048 ≈ 2.6 G values, which cannot be held, and
a subsample gives another number (the strided sampler this replaces: 0.40105 for p90 on a
DenseNet slice whose exact value is 0.40072). :class:`StreamingPercentile` is exact:

* while the values seen fit in ``max_values`` they are kept and the percentile is
  ``numpy.percentile``'s linear interpolation between two order statistics, found by
  selection (``torch.kthvalue``, O(n)) instead of a full sort: bit-identical to the sort-based
  :func:`~lightning_ood.detectors.base.percentile`, one pass;
* beyond that, a radix selection on the order-preserving integer key of each float finds the
  two order statistics the interpolation needs: pass 1 counts the keys' top 16 bits (65,536
  bins), every further pass the next 16 bits of the values that share the prefix found so far,
  so float32 takes 2 passes and float64 4, in O(65,536) memory whatever the stream length.

Counts are summed (and kept values concatenated) across DDP ranks with the detector's
:class:`~lightning_ood.detectors.base.Reducer`, so every rank finds the same value.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from lightning_ood.detectors.base import Reducer

_BINS = 1 << 16


def _order_key(x: Tensor) -> tuple[Tensor, int]:
    """Signed int64 keys with ``key(a) < key(b)`` iff ``a < b`` for finite floats, and the key
    width in bits (32 for float32 and narrower, 64 for float64)."""
    if x.dtype == torch.float64:
        bits, width, mask = x.view(torch.int64), 64, 0x7FFFFFFFFFFFFFFF
    else:
        bits, width, mask = x.float().view(torch.int32).to(torch.int64), 32, 0x7FFFFFFF
    # Negative floats: flip the magnitude bits so that a larger magnitude sorts lower.
    return torch.where(bits >= 0, bits, bits ^ mask), width


def kth_percentile(x: Tensor, p: float) -> Tensor:
    """``numpy.percentile(x, p)`` (linear interpolation) of a flat tensor by selection: the
    two order statistics the interpolation needs, the lower by ``torch.kthvalue`` and the upper
    by one masked pass, combined exactly as the sort-based
    :func:`~lightning_ood.detectors.base.percentile` does (bit-identical, O(n) instead of a
    sort of n values)."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile p must be in [0, 100], got {p}")
    v = x.flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("percentile of an empty tensor")
    pos = (n - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    frac = pos - lo
    a = torch.kthvalue(v, lo + 1).values
    if hi == lo or int(torch.count_nonzero(v <= a)) > hi:
        b = a  # the (hi + 1)-th smallest ties with the (lo + 1)-th
    else:  # the next larger value
        b = torch.where(v > a, v, torch.full((), math.inf, dtype=v.dtype, device=v.device)).min()
    return a + (b - a) * frac


def _width(dtype: torch.dtype) -> int:
    """Bits of :func:`_order_key` for values of ``dtype``."""
    return 64 if dtype == torch.float64 else 32


def _from_key(key: int, width: int) -> Tensor:
    """The float whose :func:`_order_key` is ``key``."""
    mask = 0x7FFFFFFFFFFFFFFF if width == 64 else 0x7FFFFFFF
    bits = key if key >= 0 else key ^ mask
    if width == 64:
        return torch.tensor([bits], dtype=torch.int64).view(torch.float64)[0]
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]


class StreamingPercentile:
    """Exact ``p``-th percentile (linear interpolation) of every value passed to :meth:`add`.

    Protocol: :meth:`reset`; :meth:`add` each batch; :meth:`end_pass` after each pass over the
    data. While ``end_pass`` returns True, pass the *same* values again; afterwards
    :attr:`value` holds the percentile. Non-finite values are refused (a NaN activation has
    no rank).
    """

    def __init__(self, p: float, max_values: int) -> None:
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile p must be in [0, 100], got {p}")
        self.p = float(p)
        self.max_values = int(max_values)
        self.reset()

    def reset(self) -> None:
        self.value: Tensor | None = None
        self.passes = 0
        self._kept: list[Tensor] = []
        self._count = 0  # values seen in the current pass (this rank)
        self._dtype: torch.dtype | None = None
        self._width = 0
        # Radix state: per target order statistic, the key prefix found so far and its rank
        # among the values that share it.
        self._targets: list[tuple[int, int]] = []
        self._shift = 0
        self._top = False
        self._frac = 0.0
        self._hist: Tensor | None = None
        self._device: torch.device | None = None

    @property
    def selecting(self) -> bool:
        """Whether the radix selection runs (the values did not fit in ``max_values``)."""
        return bool(self._targets)

    def add(self, x: Tensor) -> None:
        """Feed a batch of values (any shape; flattened)."""
        v = x.detach().flatten()
        # one cheap reduction; NaN/inf always make the sum non-finite (an overflowing sum of
        # finite values only costs the full check)
        if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(
                f"percentile: {bad} of {v.numel()} values are NaN/inf; the training features "
                "must be finite"
            )
        if self._dtype is None:
            self._dtype = v.dtype if v.dtype == torch.float64 else torch.float32
            self._device = v.device
            self._width = _width(self._dtype)
        self._count += v.numel()
        if not self.selecting:  # first pass: keep while small; past that, count top 16 bits
            if self._hist is None and self._count <= self.max_values:
                self._kept.append(v.to(self._dtype))
                return
            if self._hist is None:  # just overflowed: histogram what was kept, drop it
                for kept in self._kept:
                    self._add_top(kept)
                self._kept = []
            self._add_top(v.to(self._dtype))
            return
        key, _ = _order_key(v.to(self._dtype))
        for i, (prefix, _) in enumerate(self._targets):
            sel = key[(key >> (self._shift + 16)) == prefix]
            self._add_hist(i, (sel >> self._shift) & (_BINS - 1))

    def _add_top(self, v: Tensor) -> None:
        """Count the values' top 16 key bits (the first radix digit)."""
        key, _ = _order_key(v)
        self._add_hist(0, (key >> (self._width - 16)) + (_BINS // 2))

    def _add_hist(self, i: int, bins: Tensor) -> None:
        counts = torch.bincount(bins, minlength=_BINS)
        if self._hist is None:
            rows = max(1, len(self._targets))
            self._hist = torch.zeros(rows, _BINS, dtype=torch.int64, device=counts.device)
        self._hist[i] += counts

    def end_pass(self, reducer: Reducer | None = None) -> bool:
        """Close a pass; True when another pass over the same values is needed."""
        reducer = reducer or Reducer()
        self.passes += 1
        device = self._device or torch.device("cpu")
        if self._dtype is None:  # a rank that saw no value: the float32 key layout
            self._dtype, self._width = torch.float32, 32
        if not self.selecting:
            seen = torch.tensor(self._count, dtype=torch.int64, device=device)
            n = int(reducer.sum(seen))
            if n == 0:
                raise RuntimeError("percentile: no values were seen in the training pass")
            if n <= self.max_values:  # then every rank kept all its values: select from them
                dtype = self._dtype or torch.float32
                mine = (
                    (self._kept[0] if len(self._kept) == 1 else torch.cat(self._kept))
                    if self._kept
                    else torch.zeros(0, dtype=dtype)
                )
                self.value = kth_percentile(reducer.cat(mine.to(device)), self.p)
                self._finish()
                return False
            if self._hist is None:  # this rank's values fit: count their top bits now
                for kept in self._kept:
                    self._add_top(kept)
        if self._hist is None:  # a rank that saw no batch still joins the reductions
            rows = max(1, len(self._targets))
            self._hist = torch.zeros(rows, _BINS, dtype=torch.int64, device=device)
        hist = reducer.sum(self._hist).cpu()
        if not self.selecting:
            self._kept = []
            pos = (n - 1) * self.p / 100.0
            ranks = sorted({math.floor(pos), math.ceil(pos)})
            self._frac = pos - math.floor(pos)
            # (prefix, rank within prefix) per target; pass 1 saw all values (empty prefix)
            self._targets = [(0, r) for r in ranks]
            hist = hist[0:1].expand(len(ranks), -1)
            self._shift = self._width - 16
            self._top = True
        self._narrow(hist)
        if self._shift > 0:
            self._shift -= 16
            self._hist = None
            self._count = 0
            return True
        lo = _from_key(self._targets[0][0], self._width)
        hi = _from_key(self._targets[-1][0], self._width)
        self.value = lo + (hi - lo) * self._frac
        self._finish()
        return False

    def __deepcopy__(self, memo: dict[int, object]) -> StreamingPercentile:
        """Copies share the kept values (never modified in place; a new list is built when
        they change), so tuning candidates copied from one accumulation cost no memory."""
        new = copy.copy(self)
        new._kept = list(self._kept)
        new._targets = list(self._targets)
        new._hist = None if self._hist is None else self._hist.clone()
        memo[id(self)] = new
        return new

    def _narrow(self, hist: Tensor) -> None:
        """Extend each target's key prefix by the 16-bit digit that holds its rank."""
        narrowed = []
        for (prefix, rank), h in zip(self._targets, hist, strict=True):
            cum = torch.cumsum(h, 0)
            digit = int(torch.searchsorted(cum, torch.tensor(rank), right=True))
            below = int(cum[digit - 1]) if digit > 0 else 0
            # the top digit is signed (offset by half the bins); later ones extend the prefix
            new_prefix = digit - _BINS // 2 if self._top else (prefix << 16) | digit
            narrowed.append((new_prefix, rank - below))
        self._top = False
        self._targets = narrowed

    def _finish(self) -> None:
        self._kept, self._targets, self._hist = [], [], None


__all__ = ["StreamingPercentile", "kth_percentile"]
