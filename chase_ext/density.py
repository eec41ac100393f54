"""Per-tensor active counts: ERK and uniform budgets with exact counts (SPEC §2).

``erk_counts(shapes, budget)`` and ``uniform_counts(shapes, budget, dense_first)`` return
one int per tensor, summing to exactly ``budget`` (capped at the total size: a budget the
tensors cannot hold makes every tensor dense).

Rounding (SPEC §2): each tensor gets the share x_l; k_l = floor(x_l) and the
``budget - Σ floor`` leftover units go one each to the tensors with the largest
fractional remainders, equal remainders to the lower index. A tensor never gets more
than its size. The shares are exact rationals (``fractions.Fraction``): in floats, two
shares that are equal (ERK layers with the same Σ dims) can differ in the last bit and
hand the extra unit to the higher index. Should a leftover remain that the remainders
cannot place (or a negative one), units are added to / taken from the tensors in the same
remainder order (largest first to add, smallest first to take), skipping full / empty
tensors; this keeps Σ k_l == budget exactly in every case.

ERK (SPEC §2): raw_l = Σ dims / Π dims; ε solves Σ_l min(1, ε·raw_l)·n_l = B, so a
non-dense tensor's share is ε·Σ dims. Each round solves ε over the non-dense tensors with
the dense ones' sizes taken off B; every tensor with ε·raw_l >= 1 becomes dense and the
round repeats (adding all such tensors at once reaches the same fixed point as one at a
time, since ε only grows). A zero-sized tensor gets 0.

Uniform (SPEC §2: "every layer gets d"): the share is d·n_l with the configured density d
(not B/N, which differs from d by the rounding of B); with ``dense_first`` the first
tensor is dense and the others share the rest of B: (B - n_0)/(N - n_0)·n_l.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

__all__ = ["largest_remainder", "erk_counts", "uniform_counts", "erk_raw"]


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def erk_raw(shape: Sequence[int]) -> float:
    """raw_l = (Σ of the weight's dims) / (Π of its dims)."""
    n = _numel(shape)
    return float(sum(int(s) for s in shape)) / n if n > 0 else 0.0


def largest_remainder(shares: Sequence[Fraction | float], sizes: Sequence[int], total: int) -> list[int]:
    """Integers k_l <= sizes[l] near ``shares`` with Σ k_l == total (SPEC §2 rounding)."""
    total = min(int(total), sum(sizes))
    shares = [Fraction(x) for x in shares]  # exact: equal remainders must compare equal
    ks = [min(math.floor(x), n) if x > 0 else 0 for x, n in zip(shares, sizes)]
    rem = [x - math.floor(x) if x > 0 else Fraction(0) for x in shares]
    left = total - sum(ks)
    if left > 0:
        order = sorted(range(len(ks)), key=lambda i: (-rem[i], i))
        while left > 0:
            progressed = False
            for i in order:
                if left == 0:
                    break
                if ks[i] < sizes[i]:
                    ks[i] += 1
                    left -= 1
                    progressed = True
            if not progressed:  # pragma: no cover - total was capped at Σ sizes
                break
    elif left < 0:
        order = sorted(range(len(ks)), key=lambda i: (rem[i], -i))
        while left < 0:
            for i in order:
                if left == 0:
                    break
                if ks[i] > 0:
                    ks[i] -= 1
                    left += 1
    return ks


def erk_counts(shapes: Sequence[Sequence[int]], budget: int) -> list[int]:
    """ERK active counts per tensor, summing exactly to ``budget`` (capped at Σ n_l)."""
    sizes = [_numel(s) for s in shapes]
    total = sum(sizes)
    budget = min(int(budget), total)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    dims = [sum(int(d) for d in s) for s in shapes]
    dense = [n == 0 for n in sizes]
    while True:
        rest = budget - sum(n for n, d in zip(sizes, dense) if d and n > 0)
        denom = sum(m for m, d in zip(dims, dense) if not d)  # Σ raw_l·n_l = Σ Σdims_l
        if denom <= 0:
            eps = Fraction(0)
            break
        eps = Fraction(rest, denom)
        newly = [i for i in range(len(sizes)) if not dense[i] and eps * dims[i] >= sizes[i]]
        if not newly:
            break
        for i in newly:
            dense[i] = True
    shares = [Fraction(n) if d else eps * m for n, m, d in zip(sizes, dims, dense)]
    return largest_remainder(shares, sizes, budget)


def uniform_counts(
    shapes: Sequence[Sequence[int]], budget: int, dense_first: bool = False, density: float | None = None
) -> list[int]:
    """Every tensor gets density d (default B/N); optionally the first is dense (SPEC §2)."""
    sizes = [_numel(s) for s in shapes]
    total = sum(sizes)
    budget = min(int(budget), total)
    if not sizes:
        return []
    if dense_first:
        if budget < sizes[0]:
            raise ValueError(
                f"dense_first_layer=True: the first sparse tensor alone has {sizes[0]} weights, "
                f"more than the whole budget B={budget}; lower dense_first_layer or raise density"
            )
        rest_n = total - sizes[0]
        d = Fraction(budget - sizes[0], rest_n) if rest_n > 0 else Fraction(0)
        shares = [Fraction(sizes[0])] + [d * n for n in sizes[1:]]
    else:
        if density is not None:
            d = Fraction(density)
        else:
            d = Fraction(budget, total) if total > 0 else Fraction(0)
        shares = [d * n for n in sizes]
    return largest_remainder(shares, sizes, budget)
