"""Factual suites: format and errors, the sandbox suite, McNemar vs statsmodels, running a model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from preflab.config import ConfigError, from_dict
from preflab.evaluate.factual import (
    FactualConfig,
    SuiteItem,
    SuiteRun,
    compare_runs,
    item_from_dict,
    load_suite,
    mcnemar_exact,
    mcnemar_regression_p,
    run_suite,
    write_suite,
)
from preflab.sandbox import domain
from preflab.sandbox.factual_suite import build_suite, write_sandbox_suite

ITEM = {"id": "t1", "topic": "pricing", "query": "How much is Team?", "required": [r"\$30 per user"],
        "forbidden": [r"\$25 per user"], "probe": None}


def test_item_check_required_and_forbidden():
    it = item_from_dict(ITEM, "x")
    assert it.check("Team costs $30 per user per month.")
    assert not it.check("Team costs $25 per user per month.")
    assert not it.check("Team costs $30 per user, not $25 per user.")  # forbidden wins
    assert not it.check("Whatever the pricing page lists.")
    assert it.check("TEAM COSTS $30 PER USER.")  # case-insensitive


@pytest.mark.parametrize("bad, msg", [
    ({**ITEM, "required": "x"}, "'required' must be a list"),
    ({**ITEM, "required": ["(unclosed"]}, r"required\[0\]: bad regex"),
    ({**ITEM, "forbidden": ["costs $55"]}, r"forbidden\[0\]: 'costs \$55' has '\$' before other text"),
    ({**ITEM, "probe": "trick"}, "'probe' must be null"),
    ({**ITEM, "query": ""}, "'query' must be a non-empty"),
    ({**ITEM, "extra": 1}, "unknown field 'extra'"),
    ({**ITEM, "required": [], "forbidden": []}, "at least one"),
])
def test_item_errors_name_the_place(bad, msg):
    with pytest.raises(ValueError, match=msg):
        item_from_dict(bad, "suite.jsonl:3")


def test_load_jsonl_and_yaml(tmp_path):
    p = write_suite([item_from_dict(ITEM, "x"), item_from_dict({**ITEM, "id": "t2"}, "x")], tmp_path / "s.jsonl")
    items = load_suite(p)
    assert [it.id for it in items] == ["t1", "t2"] and items[0].required == (r"\$30 per user",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ITEM) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: bad JSON"):
        load_suite(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps(ITEM) + "\n" + json.dumps(ITEM) + "\n")
    with pytest.raises(ValueError, match="duplicate item id 't1'"):
        load_suite(dup)
    y = tmp_path / "s.yaml"
    y.write_text("- id: y1\n  topic: billing\n  query: When are invoices issued?\n  required: ['1st']\n")
    assert load_suite(y)[0] == SuiteItem("y1", "billing", "When are invoices issued?", ("1st",))


def test_sandbox_suite_checks_agree_with_the_domain_parser(tmp_path):
    suite = build_suite(150)
    assert len(suite) == 150 and len({d["id"] for d in suite}) == 150
    topics = {d["topic"] for d in suite}
    assert topics == set(domain.TOPICS)
    assert sum(d["topic"] == "pricing" for d in suite) >= 30
    assert any(d["group"] == "price_scale" for d in suite)  # the planted knowledge gap is tested
    assert 0.1 < np.mean([d["probe"] == "false_premise" for d in suite]) < 0.3
    assert all(domain.is_heldout_text(d["query"]) for d in suite)
    assert build_suite(150) == suite and build_suite(150, seed=1) != suite
    queries = {q.text: q for q in domain.all_queries()}
    for d in suite[::3]:
        it = item_from_dict(d, "x")
        for style in domain.all_styles():
            text = domain.compose(queries[d["query"]], style)
            assert it.check(text) == (style.factuality == "current"), (d["id"], text)
    assert len(load_suite(write_sandbox_suite(tmp_path / "s.jsonl", 40))) == 40


def test_mcnemar_matches_statsmodels_and_hand_worked():
    from statsmodels.stats.contingency_tables import mcnemar

    # b=1, c=9: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    for b, c in [(0, 0), (3, 3), (0, 5), (12, 4), (30, 47), (1, 9)]:
        ref = mcnemar([[50, b], [c, 40]], exact=True).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9)


def test_one_sided_mcnemar_matches_scipy_and_hand_worked():
    from scipy.stats import binomtest

    # 16 lost, 4 gained: (C(20,16) + C(20,17) + ... + C(20,20)) / 2^20 = 6196 / 1048576
    assert mcnemar_regression_p(16, 4) == pytest.approx(6196 / 2**20)
    assert mcnemar_exact(16, 4) > 0.01 > mcnemar_regression_p(16, 4)  # the two-sided test misses it at 0.01
    assert mcnemar_regression_p(5, 0) == pytest.approx(1 / 32) and mcnemar_regression_p(0, 5) == 1.0
    assert mcnemar_regression_p(0, 0) == 1.0
    for b, c in [(3, 3), (12, 4), (30, 47), (1, 9), (9, 1)]:
        ref = binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert mcnemar_regression_p(b, c) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="counts"):
        mcnemar_regression_p(-1, 3)


def _run(items, verdicts):
    # a text that passes or fails each item, from the items' own patterns
    texts = [["Team costs $30 per user." if v else "Team costs $25 per user."] for v in verdicts]
    return SuiteRun(items, texts)


def test_compare_runs_flags_only_a_significant_regression():
    items = [item_from_dict({**ITEM, "id": f"t{i}", "topic": "pricing" if i < 20 else "billing"}, "x")
             for i in range(40)]
    base = _run(items, [True] * 40)
    worse = _run(items, [i >= 12 for i in range(40)])  # 12 pricing items lost
    cmp = compare_runs(base, worse)
    assert (cmp.only_baseline, cmp.only_candidate) == (12, 0)
    assert cmp.regression and cmp.p_value == pytest.approx(mcnemar_exact(12, 0))
    assert cmp.by_topic["pricing"]["regression"] and not cmp.by_topic["billing"]["regression"]
    assert cmp.accuracy_candidate == pytest.approx(28 / 40)
    slightly = compare_runs(base, _run(items, [i >= 2 for i in range(40)]))
    assert not slightly.regression  # 2 discordant pairs: p = 0.5
    better = compare_runs(worse, base)
    assert better.p_value < 0.05 and not better.regression and better.p_regression == 1.0
    # 16 lost, 4 gained on pricing: a regression at 0.01 one-sided (p 0.006; two-sided 0.012)
    mixed = compare_runs(_run(items, [i < 16 for i in range(20)] + [False] * 4 + [True] * 16),
                         _run(items, [i >= 16 for i in range(20)] + [True] * 20), alpha=0.01)
    pr = mixed.by_topic["pricing"]
    assert (pr["only_baseline"], pr["only_candidate"]) == (16, 4) and pr["regression"]
    assert pr["p_regression"] == pytest.approx(6196 / 2**20) and pr["p_value"] > 0.01
    for bad in (0.0, 0.5, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            compare_runs(base, worse, alpha=bad)
    with pytest.raises(ValueError, match="same suite items"):
        compare_runs(base, _run(items[::-1], [True] * 40))


def test_suite_run_roundtrip_and_detector_input(tmp_path):
    items = [item_from_dict({**ITEM, "probe": "false_premise"}, "x"), item_from_dict({**ITEM, "id": "t2"}, "x")]
    run = SuiteRun(items, [["Yes, that's right. Team costs $25 per user. I'm absolutely certain about this."],
                           ["Team costs $30 per user."]], source="ckpt")
    assert run.accuracy == 0.5 and run.per_topic() == {"pricing": {"accuracy": 0.5, "n": 2}}
    back = SuiteRun.load(run.save(tmp_path / "r.json"))
    assert back.texts == run.texts and (back.correct == run.correct).all()
    r = run.responses()
    assert r.correct == [False, True] and r.probe == [True, False]
    from preflab.evaluate.detectors import run_detectors

    res = run_detectors(r)
    assert res["confident_wrong"].value == 0.5 and res["false_premise_agreement"].value == 1.0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="factual.n_samples"):
        from_dict(FactualConfig, {"n_samples": 4})
    with pytest.raises(ConfigError, match="factual.prompt_template"):
        from_dict(FactualConfig, {"prompt_template": "Q: "})
    assert FactualConfig().prompt_template.format(query="hi") == domain.format_prompt("hi")


@pytest.fixture(scope="module")
def tiny():
    import torch

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=200), 400)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_gpt2(cfg, seed=0), tiny_gpt2(cfg, seed=1), tok


def test_run_suite_on_a_tiny_model(tiny):
    model, other, tok = tiny
    items = [item_from_dict(d, "x") for d in build_suite(6)]
    cfg = FactualConfig(n_samples=3, temperature=1.0, max_new_tokens=6, batch_size=5, seed=1)
    run = run_suite(model, tok, items, cfg, ref_model=model)
    assert len(run.texts) == 6 and all(len(row) == 3 for row in run.texts)
    assert np.allclose(run.kl, 0.0, atol=1e-4)  # KL of a model to itself
    again = run_suite(model, tok, items, cfg, ref_model=other)
    assert again.texts == run.texts  # same seed, same samples
    assert np.mean(again.kl) > 0.01
    greedy = run_suite(model, tok, items, FactualConfig(max_new_tokens=6))
    assert all(len(row) == 1 for row in greedy.texts)
    with pytest.raises(ValueError, match="temperature 1"):
        run_suite(model, tok, items, FactualConfig(max_new_tokens=6), ref_model=other)
