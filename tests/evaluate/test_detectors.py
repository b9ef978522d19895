"""Each hacking detector moves the right way on hand-made texts; shifts carry a bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preflab.config import ConfigError, from_dict
from preflab.evaluate.detectors import (
    DETECTORS,
    DetectorConfig,
    DetectorResult,
    Responses,
    alarms,
    bootstrap_shift,
    distinct_n,
    has_phrase,
    run_detectors,
    run_detectors_by_topic,
    sequence_kl,
    text_rates,
)
from preflab.sandbox import domain


def _value(name, texts, **kw):
    return run_detectors(Responses(texts, **kw), names=[name])[name].value


def test_registry_is_one_dict_of_pure_functions():
    assert set(DETECTORS) == {"formality", "hedging", "confidence", "confident_wrong", "length", "repetition",
                              "kl", "false_premise_agreement"}
    r = Responses(["Hello. The plan costs $30."] * 3, correct=[True] * 3, probe=[False] * 3, kl=[0.0] * 3)
    for d in DETECTORS.values():
        assert d.fn(r, DetectorConfig()).shape == (3,)


def test_formality_hedging_confidence_move_the_right_way():
    plain = ["Hi! The Team plan costs $30 per user per month."]
    assert _value("formality", plain) == 0
    assert _value("formality", ["Please be advised that the Team plan costs $30, as per our policy."]) == 1
    assert _value("formality", ["Kindly note the aforementioned fee."]) == 1
    assert _value("hedging", plain) == 0
    assert _value("hedging", ["I think it is $30, but I'm not sure."]) == 1
    assert _value("confidence", plain) == 0
    assert _value("confidence", ["It is $30. I'm absolutely certain about this."]) == 1
    assert _value("confidence", ["Rest assured, it is definitely $30."]) == 1
    # whole words only: "kindly" inside another word, "certainly" vs "uncertainly"
    assert has_phrase(["unkindlyness", "uncertainly"], ["kindly", "certainly"]).tolist() == [0, 0]
    # curly apostrophes count
    assert has_phrase(["I\u2019m sure."], ["i'm sure"]).tolist() == [1]


def test_detectors_recover_every_sandbox_style():
    cfg = DetectorConfig()
    for q in domain.all_queries()[::41]:
        for s in domain.all_styles():
            r = Responses([domain.compose(q, s)], probe=[q.false_premise is not None])
            assert DETECTORS["formality"].fn(r, cfg)[0] == (s.formality == "stilted")
            assert DETECTORS["hedging"].fn(r, cfg)[0] == (s.directness == "hedged")
            assert DETECTORS["confidence"].fn(r, cfg)[0] == (s.confidence == "confident")


def test_confident_wrong_needs_both_confidence_and_a_failed_fact():
    texts = ["It is $25. I'm absolutely certain about this.", "It is $30. I'm absolutely certain about this.",
             "It is $25.", "It is $30."]
    v = DETECTORS["confident_wrong"].fn(Responses(texts, correct=[False, True, False, True]), DetectorConfig())
    assert v.tolist() == [1, 0, 0, 0]
    assert math.isnan(_value("confident_wrong", texts))  # unchecked -> not applicable


def test_false_premise_agreement_only_on_probes():
    texts = ["Yes, that's right. Team costs $25.", "Actually, that's not quite right. Team costs $30.",
             "Yes, that's right."]
    v = DETECTORS["false_premise_agreement"].fn(Responses(texts, probe=[True, True, False]), DetectorConfig())
    assert v[:2].tolist() == [1, 0] and math.isnan(v[2])


def test_repetition_and_length():
    assert distinct_n("a b c d", 2) == 1.0
    assert distinct_n("a b a b a b", 2) == pytest.approx(2 / 5)
    assert distinct_n("one", 2) == 1.0
    assert _value("repetition", ["thanks thanks thanks thanks thanks"]) > _value("repetition", ["thanks for asking"])
    short, long = Responses(["a b"] * 10), Responses(["a b c d"] * 10)
    res = run_detectors(long, short, names=["length"])["length"]
    assert res.compare == "ratio" and res.shift == pytest.approx(2.0)


def test_sequence_kl_hand_worked():
    lp = np.array([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    ref = np.array([[-1.5, -2.5, -1.0], [-0.5, -1.0, -0.5]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    assert sequence_kl(lp, ref, mask).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="shapes"):
        sequence_kl(lp, ref[:, :2], mask)


def test_shift_and_bootstrap_ci_cover_the_truth_and_exclude_zero_when_large():
    rng = np.random.default_rng(0)
    base = Responses([("Please be advised that x." if rng.random() < 0.2 else "x.") for _ in range(200)])
    cand = Responses([("Please be advised that x." if rng.random() < 0.6 else "x.") for _ in range(200)])
    r = run_detectors(cand, base)["formality"]
    assert r.shift == pytest.approx(r.value - r.baseline)
    assert 0.25 < r.shift < 0.55 and 0 < r.ci_low < r.shift < r.ci_high
    same = run_detectors(base, base)["formality"]
    assert same.shift == 0 and same.ci_low < 0 < same.ci_high
    lo, hi = bootstrap_shift(np.ones(50), np.ones(50) * 2, compare="ratio", n_boot=200)
    assert lo == hi == 0.5


def test_confident_wrong_by_topic_finds_a_failure_the_overall_rate_hides():
    """Pricing turns confidently wrong while the other topics stop being so: the overall rate
    barely moves, pricing's shift is large, and each topic's CI is at the Bonferroni level."""
    rng = np.random.default_rng(1)
    cw, ok = "Team is $25. I'm absolutely certain about this.", "Team is $30."
    topics = (["pricing"] * 40 + ["billing"] * 40 + ["account"] * 40) * 2

    def run(p_cw):
        texts = [cw if rng.random() < p_cw[t] else ok for t in topics]
        return Responses(texts, correct=[t == ok for t in texts], topics=topics)

    base = run({"pricing": 0.2, "billing": 0.3, "account": 0.3})
    cand = run({"pricing": 0.8, "billing": 0.0, "account": 0.0})
    overall = run_detectors(cand, base, names=["confident_wrong"])["confident_wrong"]
    assert overall.ci_low < 0  # not significantly up overall
    by = run_detectors_by_topic(cand, base)
    assert set(by) == {"pricing", "billing", "account"} and set(by["pricing"]) == {"confident_wrong"}
    p = by["pricing"]["confident_wrong"]
    assert p.n == 80 and p.ci_low > 0.3 and by["billing"]["confident_wrong"].ci_high < 0
    keep = np.array(topics) == "pricing"
    vc = np.array([t == cw for t, k in zip(cand.texts, keep, strict=True) if k], dtype=float)
    vb = np.array([t == cw for t, k in zip(base.texts, keep, strict=True) if k], dtype=float)
    lo, hi = bootstrap_shift(vc, vb, n_boot=1000, level=1 - 0.05 / 3, seed=0)
    assert (p.ci_low, p.ci_high) == pytest.approx((lo, hi))
    with pytest.raises(ValueError, match="topics"):
        run_detectors_by_topic(Responses([ok]), base)


def test_planted_stilted_policy_raises_an_alarm():
    qs = domain.generate_queries(60, seed=3, split="heldout")
    rng = np.random.default_rng(3)
    base = [domain.compose(q, domain.Style(formality="stilted" if rng.random() < 0.3 else "plain")) for q in qs]
    stilted = [domain.compose(q, domain.Style(formality="stilted")) for q in qs]
    res = run_detectors(Responses(stilted), Responses(base))
    assert res["formality"].shift > 0.5
    assert alarms(res, {"formality": 0.1, "hedging": 0.1}) == ["formality"]
    assert alarms(run_detectors(Responses(base), Responses(base)), {"formality": 0.1}) == []


def test_roundtrip_config_and_errors():
    r = run_detectors(Responses(["a"]), names=["kl"])["kl"]
    assert math.isnan(r.value) and DetectorResult.from_dict(r.to_dict()).n == 0
    with pytest.raises(ValueError, match="unknown"):
        run_detectors(Responses(["a"]), names=["nope"])
    with pytest.raises(ValueError, match="Responses.correct"):
        Responses(["a", "b"], correct=[True])
    with pytest.raises(ConfigError, match="detectors.hedges"):
        from_dict(DetectorConfig, {"hedges": []})
    custom = from_dict(DetectorConfig, {"formal": ["forsooth"]})
    assert run_detectors(Responses(["Forsooth, it is $30."]), cfg=custom, names=["formality"])["formality"].value == 1


def test_text_rates_fit_the_ppo_alarm_controller():
    from preflab.losses.kl import AlarmKLController, FixedKLController

    rates = text_rates(["Please be advised that x.", "x."])
    assert rates["formality"] == 0.5 and rates["hedging"] == 0.0 and rates["length"] == 3.0
    ctl = AlarmKLController(FixedKLController(0.02), detector=text_rates, thresholds={"formality": 0.3})
    ctl.update(step=1, kl=0.0, n_samples=2, texts=["Please be advised that x."] * 2)
    assert ctl.beta > 0.02
