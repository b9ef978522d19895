"""A/B statistics against textbook values and scipy/statsmodels; side invariance; length control."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.proportion import proportion_confint

from preflab.evaluate.ab import (
    ABResult,
    ab_result,
    length_controlled_win_rate,
    n_needed,
    outcome_of,
    per_topic,
    sign_test_p,
    wilson_interval,
    win_rate,
)


def test_wilson_textbook_newcombe_1998():
    # Newcombe (1998), Stat Med 17:857, example 81/263: score interval 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (136, 200), (57.5, 120), (1, 1)])
def test_wilson_matches_statsmodels(k, n):
    lo, hi = wilson_interval(k, n)
    slo, shi = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(slo, abs=1e-10) and hi == pytest.approx(shi, abs=1e-10)


def test_sign_test_hand_worked_and_scipy():
    # 10 wins, 2 losses: 2 * (C(12,0)+C(12,1)+C(12,2)) / 2^12 = 158/4096
    assert sign_test_p(10, 2) == pytest.approx(158 / 4096)
    for w, lo in [(0, 0), (5, 5), (1, 0), (30, 12), (136, 64), (7, 20)]:
        ref = 1.0 if w + lo == 0 else binomtest(w, w + lo, 0.5).pvalue
        assert sign_test_p(w, lo) == pytest.approx(ref, rel=1e-9)


def test_n_needed_hand_worked_and_close_to_arcsine_power():
    # (1.95996*0.5 + 0.84162*sqrt(.24))^2 / 0.1^2 = 193.85 -> 194
    assert n_needed(0.6) == 194
    assert n_needed(0.4) == 194  # symmetric in the direction of the gap
    # the story's 68%: (0.97998 + 0.84162*0.46648)^2 / 0.18^2 = 58.15 -> 59
    assert n_needed(0.68) == 59
    assert n_needed(0.5) is None
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    for p in (0.55, 0.6, 0.68, 0.8):
        ref = NormalIndPower().solve_power(proportion_effectsize(p, 0.5), alpha=0.05, power=0.8, ratio=0)
        assert n_needed(p) == pytest.approx(ref, rel=0.06)


def test_n_needed_gives_about_80pct_exact_power():
    from scipy.stats import binom

    p, n = 0.6, n_needed(0.6)
    # exact two-sided binomial test at alpha 0.05: reject when k <= lo or k >= hi
    ks = np.arange(n + 1)
    pv = np.minimum(1, 2 * np.minimum(binom.cdf(ks, n, 0.5), binom.sf(ks - 1, n, 0.5)))
    power = binom.pmf(ks[pv < 0.05], n, p).sum()
    assert 0.75 < power < 0.85


def test_win_rate_counts_ties_as_half():
    o = [1] * 60 + [0] * 30 + [0.5] * 10
    wr = win_rate(o)
    assert (wr.n, wr.wins, wr.losses, wr.ties) == (100, 60, 30, 10)
    assert wr.rate == pytest.approx(0.65)
    assert wr.ci_low < 0.65 < wr.ci_high
    assert wr.p_value == pytest.approx(binomtest(60, 90).pvalue)
    assert wr.n_needed == n_needed(0.65)
    with pytest.raises(ValueError, match=r"outcomes\[2\]"):
        win_rate([1, 0, 2])


def test_win_rate_invariant_to_screen_sides():
    # a rater prefers the better response whichever side it is on; the screen layout is
    # random. Outcomes come from the chosen canonical id, so any layout gives the same numbers.
    rng = np.random.default_rng(0)
    quality = {}
    pairs = []
    for i in range(200):
        cand, base = f"c{i}", f"b{i}"
        quality[cand], quality[base] = rng.normal(0.4), rng.normal(0.0)
        pairs.append((cand, base))

    def judge(left, right):
        if abs(quality[left] - quality[right]) < 0.1:
            return None
        return left if quality[left] > quality[right] else right

    results = []
    for layout_seed in (1, 2):
        flip = np.random.default_rng(layout_seed).random(len(pairs)) < 0.5
        screens = [(b, c) if f else (c, b) for (c, b), f in zip(pairs, flip, strict=True)]
        chosen = [judge(left, right) for left, right in screens]
        results.append(win_rate([outcome_of(ch, candidate=c, baseline=b)
                                 for ch, (c, b) in zip(chosen, pairs, strict=True)]))
    assert results[0] == results[1] and results[0].rate > 0.55 and results[0].ties > 0
    with pytest.raises(ValueError, match="neither"):
        outcome_of("x", candidate="c", baseline="b")


def test_length_controlled_matches_statsmodels_glm():
    import statsmodels.api as sm

    rng = np.random.default_rng(1)
    d = rng.normal(0, 30, 300)
    p = 1 / (1 + np.exp(-(0.4 + 0.02 * d)))
    o = (rng.random(300) < p).astype(float)
    o[:20] = 0.5
    lc = length_controlled_win_rate(o, d)
    # ties as half a win and half a loss (frequency weights 1/2)
    y = np.concatenate([np.where(o == 0.5, 1.0, o), np.zeros(int((o == 0.5).sum()))])
    x = np.concatenate([d, d[o == 0.5]]) / 100
    w = np.concatenate([np.where(o == 0.5, 0.5, 1.0), np.full(int((o == 0.5).sum()), 0.5)])
    fit = sm.GLM(y, sm.add_constant(x), family=sm.families.Binomial(), freq_weights=w).fit()
    assert lc.rate == pytest.approx(1 / (1 + math.exp(-fit.params[0])), abs=1e-5)
    assert lc.slope_per_100_words == pytest.approx(fit.params[1], abs=1e-4)
    lo = 1 / (1 + math.exp(-(fit.params[0] - 1.959964 * fit.bse[0])))
    assert lc.ci_low == pytest.approx(lo, abs=1e-4)


def test_length_controlled_removes_a_pure_length_preference():
    # raters prefer whichever answer is longer; the candidate is longer 80% of the time
    rng = np.random.default_rng(2)
    d = np.where(rng.random(400) < 0.8, 1, -1) * rng.integers(5, 40, 400)
    o = (rng.random(400) < 1 / (1 + np.exp(-0.08 * d))).astype(float)
    raw = win_rate(o).rate
    lc = length_controlled_win_rate(o, d)
    assert raw > 0.65
    assert abs(lc.rate - 0.5) < 0.08 and lc.ci_low < 0.5 < lc.ci_high
    assert lc.slope_per_100_words > 0


def test_per_topic_and_ab_result_roundtrip():
    o = [1, 1, 0, 0.5, 1, 0]
    topics = ["pricing", "pricing", "pricing", "billing", "billing", "billing"]
    pt = per_topic(o, topics)
    assert list(pt) == ["billing", "pricing"]
    assert pt["pricing"].rate == pytest.approx(2 / 3) and pt["billing"].rate == pytest.approx(0.5)
    res = ab_result(o, topics=topics, candidate_texts=["a b c"] * 6, baseline_texts=["a"] * 6)
    from preflab.evaluate.ab import ABResult

    assert ABResult.from_dict(res.to_dict()) == res


# ---- the round flow through a real store -------------------------------------------------


@pytest.fixture
def engine(tmp_path):
    from preflab.store import db

    eng = db.make_engine(tmp_path / "store.db")
    db.upgrade(eng)
    yield eng
    eng.dispose()


def test_blind_round_through_the_store_matches_direct_statistics(engine):
    from preflab.evaluate.ab import ABQuery, ab_result_from_round, store_ab_round
    from preflab.sandbox import domain
    from preflab.store import db, ops

    qs = domain.generate_queries(40, seed=5, split="heldout")
    queries = [ABQuery(q.id, q.text, q.topic) for q in qs]
    cand = [domain.compose(q, domain.Style(tone="warm")) + " Extra words here." for q in qs]
    base = [domain.compose(q, domain.Style(tone="dismissive", factuality="stale")) for q in qs]
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="p")
        rid = store_ab_round(s, project_id=pid, name="eval-1", queries=queries, candidate_source="runs/ppo/policy",
                             baseline_source="runs/sft", candidate_texts=cand, baseline_texts=base, seed=3)
        raters = [ops.create_rater(s, project_id=pid, name=f"r{i}") for i in range(2)]
    # raters see opaque ids and random sides; they prefer warm answers, tie every 8th
    shown_left_cand, expected, lefts = 0, [], []
    with db.session_scope(engine) as s:
        pairs = {p.id: p for p in ops.list_pairs(s, project_id=pid)}
        assert all("ppo" not in p.response_a_id + p.response_b_id + p.id for p in pairs.values())
        assert {p.response_a_source for p in pairs.values()} == {"runs/ppo/policy", "runs/sft"}  # a/b drawn
        k = 0
        while True:
            rater = raters[k % 2]
            t = ops.next_task(s, round_id=rid, rater_id=rater)
            if t is None:
                rater = raters[(k + 1) % 2]
                t = ops.next_task(s, round_id=rid, rater_id=rater)
                if t is None:
                    break
            left_is_cand = t.left_text.startswith(domain.OPENERS["warm"])
            shown_left_cand += left_is_cand
            lefts.append(left_is_cand)
            choice = "tie" if k % 8 == 7 else ("left" if left_is_cand else "right")
            expected.append(0.5 if choice == "tie" else 1.0)
            ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=rater, choice=choice, strength=1,
                                 rationale="warmer and correct", time_on_task_s=3.0, idempotency_key=f"k{k}")
            k += 1
    assert 0 < shown_left_cand < 40  # both screen layouts occurred
    with db.session_scope(engine, readonly=True) as s:
        res = ab_result_from_round(s, rid)
    assert res.candidate == "runs/ppo/policy" and res.baseline == "runs/sft"
    assert res.round["id"] == rid and res.round["pairs_judged"] == res.round["n_pairs"] == 40  # its provenance
    assert ABResult.from_dict(res.to_dict()) == res
    assert res.overall == win_rate(expected)
    assert res.overall.ties == 5 and res.overall.rate == pytest.approx(37.5 / 40)
    assert res.round["judgements_by_rater"] == {"r0": 20, "r1": 20}  # who judged: the gates name a dominant rater
    # where the candidate was shown, and which side raters picked (these raters pick by content)
    sides = res.round["sides"]
    assert (sides["candidate_left"], sides["n"], sides["decided"]) == (shown_left_cand, 40, 35)
    left_picks = sum(1 for e, left in zip(expected, lefts, strict=True) if e == 1.0 and left)
    assert sides["left_picks"] == left_picks
    from scipy.stats import binomtest

    assert sides["p_left"] == pytest.approx(binomtest(left_picks, 35, 0.5).pvalue)
    assert sum(w.n for w in res.by_topic.values()) == 40
    with db.session_scope(engine, readonly=True) as s, pytest.raises(ValueError, match="no response from"):
        ab_result_from_round(s, rid, "runs/other")
    with db.session_scope(engine) as s:  # a collection round over the same pairs is not an A/B round
        other = ops.create_round(s, project_id=pid, name="week 1", kind="collection", pair_ids=sorted(pairs),
                                 duplicate_rate=0.0)
    with db.session_scope(engine, readonly=True) as s, pytest.raises(
            ValueError, match=f"round {other}: 'week 1' is a collection round, not a blind A/B round"):
        ab_result_from_round(s, other)


def test_create_ab_round_generates_with_the_sampler(engine):
    import torch

    from preflab.evaluate.ab import ABConfig, ABQuery, create_ab_round
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
    from preflab.sandbox import domain
    from preflab.store import db, ops

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    mcfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=96,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    qs = [ABQuery(q.id, q.text, q.topic) for q in domain.generate_queries(5, seed=1, split="heldout")]
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name="p")
        rid = create_ab_round(s, project_id=pid, name="e", queries=qs, candidate=(tiny_gpt2(mcfg, seed=1), tok, "c"),
                              baseline=(tiny_gpt2(mcfg, seed=2), tok, "b"), cfg=ABConfig(max_new_tokens=5))
        info = ops.get_round(s, round_id=rid)
        assert info.kind == "eval" and info.n_items == 5 and info.duplicate_rate == 0
        assert len(ops.list_pairs(s, project_id=pid)) == 5
