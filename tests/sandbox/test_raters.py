"""Simulated raters: rubric behaviour, side invariance, calibration story, duplicate flip rate."""

from __future__ import annotations

import random

import pytest

from preflab.quality.agreement import mean_pairwise_kappa
from preflab.quality.consistency import self_consistency
from preflab.sandbox.domain import Style, compose, generate_queries
from preflab.sandbox.raters import (
    RUBRICS,
    DriftSchedule,
    SimRater,
    default_pool,
    sft_style_pairs,
    simulate_round,
    uncalibrated_pool,
)


def _query(topic):
    return next(q for q in generate_queries(200, seed=0) if q.topic == topic and q.false_premise is None)


def test_default_pool_shape():
    pool = default_pool(0)
    assert len(pool) == 5 and len({r.name for r in pool}) == 5
    assert sorted(r.specialty for r in pool) == sorted(["pricing", "billing", "account", "technical", "cancellation"])
    assert all(0.0 < r.flip_rate < 0.5 for r in pool)
    assert default_pool(0)[0].bias == pool[0].bias and default_pool(1)[0].bias != pool[0].bias
    assert len(uncalibrated_pool(7, 3)) == 7


def test_v1_cannot_verify_prices_and_rewards_confidence_v2_checks_facts():
    rater = SimRater("neutral", "billing")  # no personal bias
    q = _query("pricing")
    current = compose(q, Style(factuality="current"))
    stale = compose(q, Style(factuality="stale"))
    # v1: prices judged from memory of the old list, so the stale price looks right
    assert rater.perceived_utility(q, stale, rubric="v1") > rater.perceived_utility(q, current, rubric="v1")
    assert rater.perceived_utility(q, current, rubric="v2") > rater.perceived_utility(q, stale, rubric="v2") + 3
    conf_stale = compose(q, Style(factuality="stale", confidence="confident"))
    assert rater.perceived_utility(q, conf_stale, rubric="v1") > rater.perceived_utility(q, current, rubric="v1")
    assert rater.perceived_utility(q, conf_stale, rubric="v2") < rater.perceived_utility(q, stale, rubric="v2")
    # off pricing, v1 raters do know the facts
    qb = _query("billing")
    assert (rater.perceived_utility(qb, compose(qb, Style(factuality="current")), rubric="v1")
            > rater.perceived_utility(qb, compose(qb, Style(factuality="stale")), rubric="v1"))
    with pytest.raises(ValueError, match="rubric"):
        rater.perceived_utility(q, current, rubric="v3")


def test_judgement_fields_and_rationale_names_the_driver():
    rater = SimRater("r", "account", flip_rate=0.0)
    q = _query("billing")
    good = compose(q, Style(tone="warm", factuality="current"))
    bad = compose(q, Style(tone="dismissive", factuality="stale"))
    j = rater.judge(q, bad, good, rubric="v2", rng=random.Random(0))
    assert j.choice == "b" and 1 <= j.strength <= 3 and j.seconds > 0
    assert j.rationale.startswith("Gives the current figure") and "warmer" in j.rationale
    same = rater.judge(q, good, good, rubric="v2", rng=random.Random(0))
    assert same.choice == "tie" and same.strength == 0


def test_screen_side_does_not_change_the_judgement():
    pool = default_pool(4)
    for q, first, second in sft_style_pairs(30, seed=4):
        for r in pool:
            r.flip_rate = 0.0
            j1 = r.judge(q, first, second, rubric="v1", rng=random.Random(1))
            j2 = r.judge(q, second, first, rubric="v1", rng=random.Random(1))
            assert {"a": "b", "b": "a", "tie": "tie"}[j1.choice] == j2.choice


def test_side_randomised_rounds_give_identical_agreement():
    """Rounds with different screen sides (seeds) give the same canonical labels without lapses."""
    pairs = sft_style_pairs(40, seed=2)

    def run(side_seed):
        pool = default_pool(2)
        for r in pool:
            r.flip_rate = 0.0
        return simulate_round(pool, pairs, rubric="v1", seed=side_seed)

    b, c = run(11), run(12)
    assert b == c
    assert mean_pairwise_kappa(b) == mean_pairwise_kappa(c)


def test_calibration_pulls_bias_toward_standard():
    r = default_pool(0)[0]
    before = r.bias_norm()
    r.calibrate(0.5)
    assert r.bias_norm() == pytest.approx(before / 2)
    with pytest.raises(ValueError, match="pull"):
        r.calibrate(1.5)


def test_drift_schedule_shifts_bias_after_n():
    r = SimRater("d", "billing", drift=DriftSchedule(3, {"formality": {"stilted": 2.0}}))
    q = _query("billing")
    t = compose(q, Style())
    for _ in range(3):
        r.judge(q, t, t, rubric="v2", rng=random.Random(0))
    assert r.bias["formality"]["stilted"] == 0.0
    r.judge(q, t, t, rubric="v2", rng=random.Random(0))
    assert r.bias["formality"]["stilted"] == 2.0


def _workshop_kappas(seed):
    pool = default_pool(seed)
    before = mean_pairwise_kappa(simulate_round(pool, sft_style_pairs(50, seed=seed), rubric="v1", seed=seed))
    for r in pool:
        r.calibrate()
    after = mean_pairwise_kappa(simulate_round(pool, sft_style_pairs(50, seed=1000 + seed, split="train"),
                                               rubric="v1", seed=seed + 1))
    return before, after


def test_calibration_story_kappa_before_and_after():
    """Story: 0.54 -> 0.71 on 50 pairs. Each seed's 50-pair kappa has an SD near 0.1, so the
    ranges are checked on the mean over 5 seeds, and the gain on every seed."""
    runs = [_workshop_kappas(seed) for seed in range(5)]
    assert all(after > before for before, after in runs), runs
    mean_before = sum(b for b, _ in runs) / 5
    mean_after = sum(a for _, a in runs) / 5
    assert 0.45 <= mean_before <= 0.60, runs
    assert 0.65 <= mean_after <= 0.78, runs


def test_duplicate_flip_rate_estimate_within_007():
    pool = default_pool(0)
    pairs = sft_style_pairs(100, seed=77)
    rng = random.Random(5)
    for r in pool:
        answers = []
        for q, x, y in pairs:
            first = r.judge(q, x, y, rubric="v1", rng=rng).choice
            second = r.judge(q, y, x, rubric="v1", rng=rng).choice  # the planted duplicate, sides swapped
            canon = {"a": "x", "b": "y", "tie": "tie"}
            answers.append((canon[first], {"a": "y", "b": "x", "tie": "tie"}[second]))
        est = self_consistency(answers).flip_rate
        assert abs(est - r.flip_rate) <= 0.07, (r.name, est, r.flip_rate)


def test_rubrics_constant():
    assert RUBRICS == ("v1", "v2")
