"""Ground-truth numbers on hand-made composed responses (gold utilities worked by hand)."""

from __future__ import annotations

import json

import pytest

from preflab.sandbox.domain import FACTS, Style, compose, make_query
from preflab.sandbox.truth import policy_truth, reward_model_truth, win_rate_truth, write_truth

Q = make_query(FACTS["price_team"], 0, 0)
FP = make_query(FACTS["price_team"], 0, 1, false_premise=True)
GOOD = Style(tone="warm", factuality="current")  # 2.0 + 0.5 + 0.7 + 0.4 + 0 + 0.2 = 3.8
STALE_CONF = Style(factuality="stale", confidence="confident")  # -1.6 + 0.5 + 0.2 + 0.4 + 0.1 + 0.2 - 1.2 = -1.4


def test_policy_truth_hand_worked():
    qs = [Q, Q, FP]
    texts = [compose(Q, GOOD), compose(Q, STALE_CONF), compose(FP, STALE_CONF)]  # last: agrees with the premise
    t = policy_truth("p", qs, texts)
    assert t["gold_utility"] == pytest.approx((3.8 - 1.4 - 2.2) / 3)
    assert t["correct_rate"] == pytest.approx(1 / 3)
    assert t["confident_wrong_rate"] == pytest.approx(2 / 3)
    assert t["sycophancy_rate"] == 1.0
    assert t["unparseable_rate"] == 0.0
    assert t["by_topic"]["pricing"]["n"] == 3
    assert policy_truth("q", [Q], ["gibberish"])["unparseable_rate"] == 1.0


def test_win_rate_and_reward_model_truth():
    w = win_rate_truth("c", "b", [Q, Q, Q], [compose(Q, GOOD), compose(Q, GOOD), compose(Q, STALE_CONF)],
                       [compose(Q, STALE_CONF), compose(Q, GOOD), compose(Q, GOOD)], measured=0.6)
    assert w["gold_win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert w["gold_ties"] == pytest.approx(1 / 3)
    assert w["measured_win_rate"] == 0.6
    pairs = [(Q, compose(Q, GOOD), compose(Q, STALE_CONF), 0.5),   # label right, RM right
             (Q, compose(Q, STALE_CONF), compose(Q, GOOD), 0.2),   # label wrong, RM follows the label
             (Q, compose(Q, GOOD), compose(Q, GOOD), 1.0)]         # gold tie: skipped
    r = reward_model_truth("rm", pairs, measured_accuracy=0.7)
    assert (r["n"], r["gold_accuracy"], r["label_gold_agreement"]) == (2, 0.5, 0.5)
    with pytest.raises(ValueError, match="no pair has a gold difference"):
        reward_model_truth("rm", pairs[2:])


def test_write_truth(tmp_path):
    out = json.loads(write_truth(tmp_path, policies=[policy_truth("p", [Q], [compose(Q, GOOD)])]).read_text())
    assert out["simulated"] is True and "simulated" in out["statement"] and out["policies"][0]["gold_utility"] == pytest.approx(3.8)


def test_rater_pool_truth_keeps_every_parameter():
    from preflab.sandbox.raters import default_pool
    from preflab.sandbox.truth import rater_pool_truth

    pool = default_pool(0)
    rows = rater_pool_truth(pool)
    assert [r["name"] for r in rows] == [r.name for r in pool]
    for r, row in zip(pool, rows, strict=True):
        assert row["flip_rate"] == r.flip_rate and row["temperature"] == r.temperature
        assert row["specialty"] == r.specialty and row["median_seconds"] == r.median_seconds
        assert all(w != 0 for w in row["bias"].values())
    json.dumps(rows)  # JSON-able


def test_label_ceiling_hand_worked():
    import math

    from preflab.sandbox.raters import SimRater
    from preflab.sandbox.truth import label_ceiling

    r = SimRater("x", "billing", temperature=2.0, flip_rate=0.1)  # no bias: under v2 it perceives gold
    s = 1 / (1 + math.exp(-(3.8 + 1.4) / 2.0))  # P(close-call noise does not overturn d = 5.2)
    p = 0.9 * s + 0.1 * (1 - s)
    items = [(Q, compose(Q, GOOD), compose(Q, STALE_CONF), r, "v2"),  # label agrees with the best model
             (Q, compose(Q, STALE_CONF), compose(Q, GOOD), r, "v2"),  # label against it (a lapse or noise)
             (Q, "gibberish", "more gibberish", r, "v2")]  # both unparseable: d = 0, a coin flip
    c = label_ceiling(items)
    assert c["n"] == 3
    assert c["expected"] == pytest.approx((p + p + 0.5) / 3)
    assert c["observed"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert c["one_minus_lapse"] == pytest.approx(0.9)
    assert c["expected"] < c["one_minus_lapse"]  # close calls cost even the best model
    with pytest.raises(ValueError, match="no pairs"):
        label_ceiling([])
