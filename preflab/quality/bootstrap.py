"""Bootstrap confidence intervals for agreement statistics, resampling *items* (seeded).

Percentile bootstrap (Efron & Tibshirani 1993, ch. 13): draw n items with replacement,
recompute the statistic, take the (1-level)/2 and (1+level)/2 quantiles of the replicates.
Items, not ratings, are the unit: a rater's judgements of one item stay together.

A resample is represented by how often it drew each item (``bootstrap_weights``). The
statistics of ``quality.agreement`` have batched twins that take those counts for all
replicates at once (numpy over replicates, a matrix product instead of a Python loop of
table copies); other statistics are computed on each resampled table in turn. Both paths
draw the same resamples for the same seed, so they give the same replicates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from preflab.quality.agreement import (
    LabelMatrix,
    LabelTable,
    encode,
    fleiss_kappa,
    fleiss_kappa_batched,
    krippendorff_alpha,
    krippendorff_alpha_batched,
    mean_pairwise_kappa,
    mean_pairwise_kappa_batched,
    percent_agreement,
    percent_agreement_batched,
)

# statistic -> its batched twin f(m, weights (B, n_items)) -> (B,) with NaN where undefined
BATCHED: dict[Callable, Callable[..., np.ndarray]] = {
    mean_pairwise_kappa: mean_pairwise_kappa_batched,
    fleiss_kappa: fleiss_kappa_batched,
    krippendorff_alpha: krippendorff_alpha_batched,
    percent_agreement: percent_agreement_batched,
}


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


def bootstrap_rows(n_items: int, *, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n_items) item indices drawn with replacement, one row per resample (seeded)."""
    if n_boot < 1:
        raise ValueError(f"bootstrap: n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))


def bootstrap_weights(rows: np.ndarray, n_items: int) -> np.ndarray:
    """(n_boot, n_items) how many times each resample (row of ``bootstrap_rows``) drew each item."""
    b = rows.shape[0]
    flat = (np.arange(b)[:, None] * n_items + rows).ravel()
    return np.bincount(flat, minlength=b * n_items).reshape(b, n_items)


def _batched(statistic: Callable) -> Callable[..., np.ndarray] | None:
    if isinstance(statistic, functools.partial) and statistic.func in BATCHED and not statistic.args:
        return functools.partial(BATCHED[statistic.func], **statistic.keywords)
    return BATCHED.get(statistic)


def bootstrap_replicates(
    labels: LabelTable | LabelMatrix,
    statistic: Callable[[LabelMatrix], float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """(replicates, n_failed): ``statistic`` on ``n_boot`` item resamples; failures (undefined) skipped."""
    m = encode(labels)
    n = m.codes.shape[0]
    rows = bootstrap_rows(n, n_boot=n_boot, seed=seed)
    batched = _batched(statistic)
    if batched is not None:
        reps = batched(m, bootstrap_weights(rows, n))
        ok = ~np.isnan(reps)
        return reps[ok], int((~ok).sum())
    vals, failed = [], 0
    for r in rows:
        try:
            vals.append(float(statistic(m.take(r))))
        except ValueError:
            failed += 1
    return np.asarray(vals), failed


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
