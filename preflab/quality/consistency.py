"""Self-consistency on planted duplicates and the accuracy ceiling it implies (docs/quality.md).

A planted duplicate is an item shown to the same rater twice (sides swapped); both answers are
recorded as canonical labels, so a swap cannot masquerade as a flip.

Model: a rater has one considered answer per item and flips it with probability e on each
showing. Two showings agree with probability c = (1 - e)^2 + e^2, hence
e = (1 - sqrt(2c - 1)) / 2, and no model can match that rater's labels better than about
ceiling = 1 - e. c < 0.5 is below what coin-flipping gives (c = 0.5 at e = 0.5) and is
defined as e = 0.5, ceiling = 0.5. The model has two answers; a "tie" counts as a third
label, so a duplicate answered a then tie counts as inconsistent.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

# a ceiling from fewer planted duplicates than this is too uncertain to judge a reward model against
MIN_CEILING_DUPLICATES = 30


def flip_rate_from_consistency(c: float) -> float:
    """e = (1 - sqrt(2c - 1)) / 2 for c in [0.5, 1]; c < 0.5 -> 0.5 (documented clamp)."""
    if not 0.0 <= c <= 1.0:
        raise ValueError(f"flip_rate_from_consistency: c must be in [0, 1], got {c}")
    if c <= 0.5:
        return 0.5
    return (1.0 - math.sqrt(2.0 * c - 1.0)) / 2.0


def consistency_from_flip_rate(e: float) -> float:
    """c = (1 - e)^2 + e^2."""
    return (1.0 - e) ** 2 + e * e


def accuracy_ceiling(c: float) -> float:
    """Best accuracy any model can reach on labels of a rater with consistency c: 1 - e."""
    return 1.0 - flip_rate_from_consistency(c)


def wilson_interval(successes: float, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998).

    With p = successes/n and z the two-sided normal quantile::

        centre = (p + z^2/(2n)) / (1 + z^2/n)
        half   = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)

    ``successes`` may be fractional (ties counted as half a win). With n = 0 nothing is known:
    (0, 1). The one implementation: rater consistency, blind A/B win rates and production
    outcome rates all use it.
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes: must be in [0, n={n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Consistency:
    """One rater's duplicate self-consistency, its 95% Wilson interval and the implied figures."""

    n: int
    consistency: float
    low: float
    high: float
    flip_rate: float
    ceiling: float
    ceiling_low: float  # from the interval's lower end (e and the ceiling are monotone in c)
    ceiling_high: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def self_consistency(answers: Sequence[tuple[Hashable, Hashable]]) -> Consistency:
    """Consistency of one rater over duplicate answer pairs ``[(first, second), ...]``."""
    n = len(answers)
    if n == 0:
        raise ValueError("self_consistency: no duplicate pairs")
    same = sum(1 for a, b in answers if a == b)
    c = same / n
    lo, hi = wilson_interval(same, n)
    return Consistency(n, c, lo, hi, flip_rate_from_consistency(c), accuracy_ceiling(c),
                       accuracy_ceiling(lo), accuracy_ceiling(hi))


def consistency_by_rater(
    duplicates: Mapping[Hashable, Sequence[tuple[Hashable, Hashable]]],
) -> dict[Hashable, Consistency]:
    """:func:`self_consistency` for every rater with at least one duplicate pair."""
    return {r: self_consistency(pairs) for r, pairs in duplicates.items() if len(pairs) > 0}


@dataclass(frozen=True)
class SidePreference:
    """How often a rater picked the answer shown on the left, of their non-tie judgements."""

    left: int
    n: int
    share: float | None  # left / n (None when n = 0)
    low: float  # Wilson 95%
    high: float
    p_value: float  # exact two-sided binomial test of share = 0.5

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def side_preference(left: int, n: int) -> SidePreference:
    """Position bias: sides are randomised per showing, so a rater judging content picks left about
    half the time whatever they prefer; a share far from 0.5 (small p) is a rater clicking a side.
    Duplicates swap sides, so such a rater also looks inconsistent (an always-left rater's
    duplicates all disagree, c = 0) — this column says why."""
    if not 0 <= left <= n:
        raise ValueError(f"left: must be in [0, n={n}], got {left}")
    if n == 0:
        return SidePreference(0, 0, None, 0.0, 1.0, 1.0)
    from scipy.stats import binom

    lo, hi = wilson_interval(left, n)
    tail = float(binom.cdf(min(left, n - left), n, 0.5))  # exact two-sided test at 0.5: twice the smaller tail
    return SidePreference(left, n, left / n, lo, hi, min(1.0, 2 * tail))
