"""Means and paired differences of per-item scores, with normal 95% intervals.

Two models scored on the *same* items (two reward models on one validation set, two policies
on one query set) differ by less than two separate intervals suggest: the items' own
difficulty is shared. The paired difference is the mean of d_i = a_i - b_i over items both
scored, with the interval mean +- 1.96 s_d / sqrt(n) (the Wald interval for paired proportions,
Agresti 2013 sec. 11.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def mean_ci(xs: Sequence[float]) -> tuple[float, list[float]]:
    """Mean with a normal-approximation 95% interval, mean +- 1.96 s / sqrt(n) (n = 1: zero width)."""
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = math.fsum(xs) / n
    if n < 2:
        return m, [m, m]
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    return m, [m - 1.96 * s / math.sqrt(n), m + 1.96 * s / math.sqrt(n)]


def paired_diff(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """Difference of two scores on the same items: ``{"diff", "ci", "n"}`` over items both scored
    (None: not scored); NaN with n = 0 when none is."""
    if len(a) != len(b):
        raise ValueError(f"paired_diff: {len(a)} and {len(b)} items; the scores must be of the same items")
    d = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not d:
        return {"diff": math.nan, "ci": [math.nan, math.nan], "n": 0}
    m, ci = mean_ci(d)
    return {"diff": m, "ci": ci, "n": len(d)}
