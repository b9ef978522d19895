"""The production simulator: calibrated to the story's anchors, seeded, monotone in quality."""

from __future__ import annotations

import numpy as np
import pytest

from preflab.config import ConfigError, from_dict
from preflab.report.outcomes import read_outcomes
from preflab.sandbox.domain import SFT_STYLE_MIX, Style
from preflab.sandbox.outcomes import (
    GOOD_STYLE_MIX,
    ProductionConfig,
    _expected_rounded,
    calibrate,
    expected_csat,
    expected_escalation,
    fixed_style_policy,
    simulate_production,
    style_mix_utilities,
    style_policy,
    write_production_log,
)


def test_calibration_hits_the_anchors_exactly():
    cfg = ProductionConfig()
    p = calibrate(cfg)
    assert p.b < 0 and p.c1 > 0  # better answers: fewer escalations, happier customers
    for mix, esc, csat in ((SFT_STYLE_MIX, 0.31, 3.6), (GOOD_STYLE_MIX, 0.19, 4.1)):
        u, w = style_mix_utilities(mix, false_premise_rate=cfg.false_premise_rate)
        assert w.sum() == pytest.approx(1.0)
        assert expected_escalation(p.a, p.b, u, w, cfg.mood_sd) == pytest.approx(esc, abs=1e-6)
        assert expected_csat(p, u, w, cfg) == pytest.approx(csat, abs=1e-6)


def test_expected_rounded_csat_matches_monte_carlo():
    rng = np.random.default_rng(0)
    for m in (0.5, 2.7, 3.9, 5.6):
        draws = np.clip(np.rint(m + 0.9 * rng.standard_normal(200_000)), 1, 5)
        assert float(_expected_rounded(np.array(m), 0.9)) == pytest.approx(draws.mean(), abs=0.01)


def _rates(rows):
    return np.mean([r.escalated for r in rows]), np.mean([r.csat for r in rows])


def test_simulated_rates_land_on_the_story():
    cfg = ProductionConfig(conversations_per_week=4000, weeks=1, seed=3)
    esc_s, csat_s = _rates(simulate_production(style_policy(SFT_STYLE_MIX, seed=1), model_version="sft", cfg=cfg))
    esc_g, csat_g = _rates(simulate_production(style_policy(GOOD_STYLE_MIX, seed=1), model_version="v2", cfg=cfg))
    # binomial SE at n=4000 is ~0.007: 3.5 SE bands
    assert esc_s == pytest.approx(0.31, abs=0.025) and esc_g == pytest.approx(0.19, abs=0.025)
    assert csat_s == pytest.approx(3.6, abs=0.06) and csat_g == pytest.approx(4.1, abs=0.06)


def test_outcomes_are_monotone_in_quality():
    cfg = ProductionConfig(conversations_per_week=1500, weeks=1)
    best = Style(tone="warm", factuality="current")
    worst = Style(tone="dismissive", directness="hedged", factuality="stale", formality="stilted",
                  confidence="confident", padding="padded")
    rb = simulate_production(fixed_style_policy(best), model_version="best", cfg=cfg)
    rw = simulate_production(fixed_style_policy(worst), model_version="worst", cfg=cfg)
    assert _rates(rb)[0] < _rates(rw)[0] - 0.15
    assert _rates(rb)[1] > _rates(rw)[1] + 0.8
    assert np.median([r.handle_time_min for r in rb]) < np.median([r.handle_time_min for r in rw])


def test_seeded_and_well_formed():
    cfg = ProductionConfig(conversations_per_week=50, weeks=2, seed=7, start="2026-03-02")
    a = simulate_production(style_policy(SFT_STYLE_MIX, seed=1), model_version="sft", cfg=cfg, first_week=1)
    b = simulate_production(style_policy(SFT_STYLE_MIX, seed=1), model_version="sft", cfg=cfg, first_week=1)
    c = simulate_production(style_policy(SFT_STYLE_MIX, seed=1), model_version="sft",
                            cfg=ProductionConfig(conversations_per_week=50, weeks=2, seed=8, start="2026-03-02"),
                            first_week=1)
    assert a == b and a != c
    assert len(a) == 100 and len({r.conversation_id for r in a}) == 100
    assert all(r.csat in (1, 2, 3, 4, 5) and r.escalated in (0, 1) and r.handle_time_min > 0 for r in a)
    assert a[0].timestamp >= "2026-03-09" and a[-1].timestamp < "2026-03-23"  # weeks 1 and 2 after the start
    assert sorted(r.timestamp for r in a[:50]) == [r.timestamp for r in a[:50]]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_logs_round_trip_through_the_importer(tmp_path, suffix):
    cfg = ProductionConfig(conversations_per_week=30, weeks=1)
    rows = simulate_production(style_policy(GOOD_STYLE_MIX), model_version="ppo_v2", cfg=cfg)
    recs = read_outcomes(write_production_log(rows, tmp_path / f"log{suffix}"))
    assert [(r.conversation_id, int(r.escalated), r.csat, r.handle_time_min, r.timestamp) for r in recs] == \
        [(r.conversation_id, r.escalated, r.csat, r.handle_time_min, r.timestamp) for r in rows]


def test_bad_config_and_bad_policy_name_the_place():
    with pytest.raises(ConfigError, match=r"ProductionConfig.good_escalation"):
        from_dict(ProductionConfig, {"good_escalation": 0.4})
    with pytest.raises(ConfigError, match=r"ProductionConfig.start"):
        from_dict(ProductionConfig, {"start": "last monday"})
    with pytest.raises(ConfigError, match=r"conversations_per_week"):
        from_dict(ProductionConfig, {"conversations_per_week": 0})
    with pytest.raises(ValueError, match=r"respond: returned 1 texts for 5"):
        simulate_production(lambda qs: ["x"], model_version="v", cfg=ProductionConfig(conversations_per_week=5, weeks=1))


def test_sampling_policy_drives_the_simulator_with_a_model():
    import torch

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
    from preflab.sandbox.domain import sandbox_texts
    from preflab.sandbox.outcomes import sampling_policy

    torch.set_num_threads(1)
    tok = train_tokenizer(sandbox_texts(seed=0, n=200), 300)
    model = tiny_gpt2(tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=128,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), seed=0)
    cfg = ProductionConfig(conversations_per_week=12, weeks=1)
    rows = simulate_production(sampling_policy(model, tok, max_new_tokens=8, batch_size=5, seed=1),
                               model_version="random", cfg=cfg)
    again = simulate_production(sampling_policy(model, tok, max_new_tokens=8, batch_size=5, seed=1),
                                model_version="random", cfg=cfg)
    assert len(rows) == 12 and rows == again  # seeded sampling -> identical logs


def test_cached_policy_samples_each_distinct_query_k_times():
    from preflab.sandbox.outcomes import cached_policy

    calls = []

    def respond(qs):
        calls.append(len(qs))
        return [f"{q.text}#{i}" for i, q in enumerate(qs)]

    cfg = ProductionConfig(conversations_per_week=1500, weeks=2)
    pol = cached_policy(respond, samples_per_query=3, seed=0)
    rows = simulate_production(pol, model_version="v", cfg=cfg)
    assert len(rows) == 3000
    from preflab.sandbox.domain import generate_queries

    distinct = {q.text for w in range(2) for q in generate_queries(1500, seed=w, split="heldout", false_premise_rate=0.1)}
    assert sum(calls) == 3 * len(distinct) < 1500  # sampled once per distinct text, not per conversation
    with pytest.raises(ValueError, match="samples_per_query"):
        cached_policy(respond, samples_per_query=0)
