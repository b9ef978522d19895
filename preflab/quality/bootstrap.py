"""Bootstrap confidence intervals for agreement statistics, resampling *items* (seeded).

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw n items with replacement,
recompute the statistic, take the (1-level)/2 and (1+level)/2 quantiles of the replicates.
Items, not ratings, are the unit: a rater's judgements of one item stay together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from preflab.quality.agreement import LabelMatrix, LabelTable, encode


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int  # replicates that produced a value
    n_failed: int = 0  # replicates where the statistic was undefined (e.g. no shared item)

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level,
                "n_boot": self.n_boot, "n_failed": self.n_failed}


def bootstrap_replicates(
    labels: LabelTable | LabelMatrix,
    statistic: Callable[[LabelMatrix], float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """(replicates, n_failed): ``statistic`` on ``n_boot`` item resamples; failures skipped."""
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    m = encode(labels)
    n = m.codes.shape[0]
    rng = np.random.default_rng(seed)
    reps, failed = [], 0
    for _ in range(n_boot):
        try:
            reps.append(float(statistic(m.take(rng.integers(0, n, size=n)))))
        except ValueError:
            failed += 1
    return np.asarray(reps), failed


def bootstrap_ci(
    labels: LabelTable | LabelMatrix,
    statistic: Callable[[LabelMatrix], float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """``statistic`` on the full table with a percentile bootstrap interval over items.

    Replicates where ``statistic`` raises ``ValueError`` (undefined on that resample) are
    skipped and counted in ``n_failed``; if every replicate fails the interval is the point.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    m = encode(labels)
    value = float(statistic(m))
    reps, failed = bootstrap_replicates(m, statistic, n_boot=n_boot, seed=seed)
    if reps.size == 0:
        return Estimate(value, value, value, level, 0, failed)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(lo), float(hi), level, len(reps), failed)
