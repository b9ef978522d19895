"""Bootstrap intervals over items, duplicate self-consistency and the accuracy ceiling."""

from __future__ import annotations

import math
import random

import pytest

from preflab.quality.agreement import fleiss_kappa, mean_pairwise_kappa
from preflab.quality.bootstrap import bootstrap_ci
from preflab.quality.consistency import (
    accuracy_ceiling,
    consistency_by_rater,
    consistency_from_flip_rate,
    flip_rate_from_consistency,
    self_consistency,
    side_preference,
    wilson_interval,
)


def _table(seed, n=60, agree=0.7):
    rng = random.Random(seed)
    t = {}
    for i in range(n):
        truth = rng.choice("xy")
        t[i] = {r: truth if rng.random() < agree else rng.choice("xy") for r in "abcd"}
    return t


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    t = _table(1)
    a = bootstrap_ci(t, mean_pairwise_kappa, n_boot=200, seed=3)
    b = bootstrap_ci(t, mean_pairwise_kappa, n_boot=200, seed=3)
    c = bootstrap_ci(t, mean_pairwise_kappa, n_boot=200, seed=4)
    assert a == b and a != c
    assert a.low <= a.value <= a.high and a.n_boot == 200
    assert a.value == mean_pairwise_kappa(t)


def test_bootstrap_width_shrinks_with_more_items():
    small = bootstrap_ci(_table(2, n=30), fleiss_kappa, n_boot=300, seed=0)
    big = bootstrap_ci(_table(2, n=480), fleiss_kappa, n_boot=300, seed=0)
    assert (big.high - big.low) < 0.5 * (small.high - small.low)


def test_bootstrap_resamples_items_matches_manual_replicate():
    import numpy as np

    from preflab.quality.agreement import encode

    t = _table(5, n=20)
    m = encode(t)
    rng = np.random.default_rng(11)
    rows = rng.integers(0, 20, size=20)
    manual = fleiss_kappa({k: t[m.items[i]] for k, i in enumerate(rows)})
    assert fleiss_kappa(m.take(rows)) == pytest.approx(manual, abs=1e-12)


def test_bootstrap_counts_undefined_replicates():
    t = {1: {"a": "x", "b": "x"}, 2: {"a": "y"}}
    est = bootstrap_ci(t, fleiss_kappa, n_boot=100, seed=0)
    assert est.n_failed > 0 and est.n_boot + est.n_failed == 100
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(t, fleiss_kappa, n_boot=0)


@pytest.mark.parametrize("e", [0.0, 0.05, 0.1, 0.25, 0.5])
def test_flip_rate_roundtrip(e):
    c = consistency_from_flip_rate(e)
    assert flip_rate_from_consistency(c) == pytest.approx(e, abs=1e-12)
    assert accuracy_ceiling(c) == pytest.approx(1 - e, abs=1e-12)


def test_hand_worked_ceiling_and_clamp():
    # c = 0.82 -> 2c - 1 = 0.64 -> e = (1 - 0.8) / 2 = 0.1 -> ceiling 0.9
    assert flip_rate_from_consistency(0.82) == pytest.approx(0.1, abs=1e-12)
    assert flip_rate_from_consistency(0.3) == 0.5 and accuracy_ceiling(0.3) == 0.5
    with pytest.raises(ValueError):
        flip_rate_from_consistency(1.2)


def test_wilson_reference_values():
    # reference: statsmodels proportion_confint(method="wilson")
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = wilson_interval(81, 100)
    rlo, rhi = proportion_confint(81, 100, method="wilson")
    assert lo == pytest.approx(rlo, abs=1e-9) and hi == pytest.approx(rhi, abs=1e-9)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)


def test_self_consistency_figures():
    answers = [("r1", "r1")] * 82 + [("r1", "r2")] * 18
    c = self_consistency(answers)
    assert c.n == 100 and c.consistency == pytest.approx(0.82)
    assert c.flip_rate == pytest.approx(0.1) and c.ceiling == pytest.approx(0.9)
    assert c.low < 0.82 < c.high and c.ceiling_low < c.ceiling < c.ceiling_high
    assert set(consistency_by_rater({"a": answers, "b": []})) == {"a"}
    with pytest.raises(ValueError):
        self_consistency([])


def test_duplicate_estimate_recovers_simulated_flip_rate():
    rng = random.Random(0)
    e = 0.12
    est = []
    for _ in range(200):
        pairs = []
        for _ in range(400):
            base = rng.choice(["x", "y"])
            ans = [base if rng.random() > e else ("y" if base == "x" else "x") for _ in range(2)]
            pairs.append(tuple(ans))
        est.append(self_consistency(pairs).flip_rate)
    assert sum(est) / len(est) == pytest.approx(e, abs=0.01)
    assert math.isfinite(max(est))


@pytest.mark.parametrize(("left", "n"), [(10, 10), (5, 10), (3, 12), (40, 60), (2600, 5000), (0, 7)])
def test_side_preference_is_the_exact_binomial_test(left, n):
    from scipy.stats import binomtest

    sp = side_preference(left, n)
    assert sp.p_value == pytest.approx(binomtest(left, n, 0.5).pvalue, rel=1e-9)
    assert sp.share == left / n and sp.low <= sp.share <= sp.high


def test_side_preference_edges():
    assert side_preference(0, 0).share is None and side_preference(0, 0).p_value == 1.0
    assert side_preference(44, 44).p_value < 1e-12  # a rater who always clicks left
    with pytest.raises(ValueError, match="left: must be in"):
        side_preference(5, 4)
