"""diagnose separates a knowledge gap (never right in n) from a preference problem (sometimes right),
and with a baseline a fact lost by optimisation (never right now, right in the baseline) from a gap."""

from __future__ import annotations

import random

import pytest

from preflab.config import ConfigError, from_dict
from preflab.evaluate.diagnose import (
    DiagnoseConfig,
    classify,
    diagnose,
    diagnose_run,
    fisher_lost_p,
    render_never_right,
    render_tables,
    upper_bound,
)
from preflab.evaluate.factual import SuiteRun, item_from_dict
from preflab.sandbox import domain
from preflab.sandbox.factual_suite import build_suite

ITEMS = [item_from_dict(d, "suite") for d in build_suite(150)]
QUERIES = {q.text: q for q in domain.all_queries()}


def stub_sft_sampler(n: int, seed: int = 0, *, lost: tuple[str, ...] = (), confident_lost: bool = False) -> SuiteRun:
    """Stands in for the sandbox SFT model: the SFT style mix, and for a fact the corpus never
    states (in_corpus=False) it can only guess a stale or vague value. ``lost``: groups whose
    current value a policy has lost (stale instead), said confidently if ``confident_lost``."""
    rng = random.Random(seed)
    texts = []
    for it in ITEMS:
        q = QUERIES[it.query]
        row = []
        for _ in range(n):
            s = domain.sample_style(rng)
            if not domain.FACTS[q.fact_id].in_corpus and s.factuality == "current":
                s = domain.Style(**{**s.to_dict(), "factuality": rng.choice(["stale", "vague"])})
            if it.group in lost:
                s = domain.Style(**{**s.to_dict(), "factuality": "stale",
                                    **({"confidence": "confident"} if confident_lost else {})})
            row.append(domain.compose(q, s))
        texts.append(row)
    return SuiteRun(ITEMS, texts)


def test_classify():
    assert [classify(0, 16), classify(3, 16), classify(16, 16)] == ["knowledge_gap", "preference", "ok"]
    assert [classify(0, 16, 0), classify(0, 16, 1), classify(3, 16, 0)] == [
        "knowledge_gap", "lost_by_optimisation", "preference"]


def test_upper_bound_against_scipy():
    from scipy.stats import binomtest

    assert upper_bound(0, 16) == pytest.approx(0.1707, abs=1e-4)  # 1 - 0.05^(1/16)
    assert upper_bound(0, 64) == pytest.approx(1 - 0.05 ** (1 / 64))
    assert upper_bound(0, 100) == pytest.approx(3 / 100, abs=2e-3)  # the rule of three
    assert upper_bound(16, 16) == 1.0
    for k, n in ((0, 16), (1, 16), (5, 16), (7, 64), (63, 64)):
        # the one-sided 95% upper bound is the upper end of the two-sided 90% Clopper-Pearson interval
        ref = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").high
        assert upper_bound(k, n) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="upper_bound"):
        upper_bound(3, 2)


def test_fisher_lost_p_against_scipy():
    from scipy.stats import fisher_exact

    # the walkthrough's pooled prices: two-sided 1.9e-6, so one-sided half of it
    assert fisher_lost_p(18, 64, 0, 64) == pytest.approx(9.5e-7, rel=0.01)
    assert fisher_lost_p(1, 16, 0, 16) == pytest.approx(0.5)
    for b, nb, c, nc in ((5, 16, 0, 16), (3, 16, 0, 16), (21, 64, 2, 64), (0, 16, 0, 16), (4, 8, 0, 16)):
        ref = fisher_exact([[b, nb - b], [c, nc - c]], alternative="greater").pvalue
        assert fisher_lost_p(b, nb, c, nc) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="fisher_lost_p"):
        fisher_lost_p(17, 16, 0, 16)


def test_separates_planted_gap_from_stale_price_preference_problem():
    d = diagnose_run(stub_sft_sampler(16))
    groups = {r.name: r for r in d.by_group}
    assert groups["price_scale"].knowledge_gap == groups["price_scale"].items > 0
    for g in ("price_team", "price_starter", "price_business"):
        assert groups[g].knowledge_gap == 0 and groups[g].preference > 0
        assert groups[g].any_of_n_accuracy == 1.0 > groups[g].first_sample_accuracy
    pricing = next(r for r in d.by_topic if r.name == "pricing")
    assert pricing.knowledge_gap == groups["price_scale"].items
    assert "wholly missing: price_scale" in d.verdict and "preference problems RLHF can fix)" in d.verdict
    assert d.kind_of(next(i.id for i in ITEMS if i.group == "price_scale")) == "knowledge_gap"
    from rich.console import Console

    c = Console(record=True, width=160)
    c.print(render_tables(d))
    c.print(render_tables(d, groups=True))
    assert "price_scale" in c.export_text()
    assert d.to_dict()["by_topic"][0]["name"] == "account"


def test_baseline_tells_facts_lost_by_optimisation_from_gaps():
    # the policy lost price_starter (now stale and confident); the SFT baseline still says it
    base = stub_sft_sampler(16, seed=2)
    policy = stub_sft_sampler(16, seed=3, lost=("price_starter",), confident_lost=True)
    alone = diagnose_run(policy)
    starter = [i for i in alone.items if i.group == "price_starter"]
    assert starter and all(i.kind == "knowledge_gap" and i.right == 0 for i in starter)
    assert "run with --baseline" in alone.verdict and "a fact the policy lost" in alone.verdict
    assert "up to 17%, 95% bound" in alone.verdict and alone.fixes == []

    d = diagnose_run(policy, baseline=base, baseline_name="sft", temperature=1.0)
    lost = [i for i in d.items if i.kind == "lost_by_optimisation"]
    assert all(d.kind_of(i.id) == "lost_by_optimisation" for i in starter)
    assert len(lost) < len(starter) + 3  # and by chance (0 of 16 at 38%) a stray one or two
    for i in lost:
        assert i.baseline_n == 16 and i.baseline_right > 0
        assert i.p_lost == pytest.approx(fisher_lost_p(i.baseline_right, 16, 0, 16))
        assert i.upper95 == pytest.approx(1 - 0.05 ** (1 / 16))
    assert all(d.kind_of(i.id) == "knowledge_gap" for i in ITEMS if i.group == "price_scale")
    for i in d.items:  # every item carries its Fisher p against the baseline
        assert i.p_lost == pytest.approx(fisher_lost_p(i.baseline_right, 16, i.right, 16))
    worse = sum(i.kind == "preference" and i.p_lost < 0.05 for i in d.items)
    assert f"{worse} of them right less often than in the baseline" in d.verdict
    pricing = next(r for r in d.by_topic if r.name == "pricing")
    assert pricing.lost_by_optimisation == len(lost) and pricing.knowledge_gap == sum(
        i.group == "price_scale" for i in ITEMS)
    sig = [i for i in lost if i.p_lost < 0.05]
    assert f"{len(lost)}/150 items lost by optimisation" in d.verdict and f"{len(sig)} with Fisher p < 0.05" in d.verdict
    assert "wholly missing: price_scale;" in d.verdict
    br = sum(i.baseline_right for i in lost)
    pooled = d.to_dict()["lost_pooled"]
    assert pooled["baseline_right"] == br and pooled["n"] == 16 * len(lost) and pooled["right"] == 0
    assert pooled["p"] == pytest.approx(fisher_lost_p(br, 16 * len(lost), 0, 16 * len(lost)))
    assert f"pooled, the baseline {br}/{16 * len(lost)} vs 0/{16 * len(lost)}" in d.verdict
    assert sig and d.fixes == ["preflab rerate --where topic=pricing --guideline NEW_VERSION --db DB --project PROJECT"]

    # confident-wrong per topic: the detector's share, and the shift from the baseline
    from preflab.evaluate.detectors import DetectorConfig, confident_wrong

    rp = policy.responses()
    topics = [t == "pricing" for t in rp.topics]
    v = confident_wrong(rp, DetectorConfig())
    assert pricing.confident_wrong == pytest.approx(v[topics].mean())
    vb = confident_wrong(base.responses(), DetectorConfig())
    assert pricing.confident_wrong_baseline == pytest.approx(vb[topics].mean())
    assert pricing.confident_wrong_shift == pytest.approx(v[topics].mean() - vb[topics].mean())
    assert pricing.confident_wrong_ci_low > 0 and "Confident-wrong answers up in pricing" in d.verdict

    from rich.console import Console

    c = Console(record=True, width=250)
    c.print(render_tables(d))
    c.print(render_never_right(d))
    text = c.export_text()
    assert "lost by optimisation" in text and "price_starter" in text and "17%" in text

    js = d.to_dict()
    assert js["baseline"] == "sft" and js["items"][0]["baseline_n"] == 16
    # the fields the old format had are all still there
    old = {"n_samples", "verdict", "items", "by_topic", "by_group"}
    assert old <= set(js) and {"id", "topic", "group", "n", "right", "first_right", "kind"} <= set(js["items"][0])
    assert {"name", "items", "first_sample_accuracy", "any_of_n_accuracy", "mean_sample_accuracy", "knowledge_gap",
            "preference", "ok"} <= set(js["by_topic"][0])


def test_one_right_sample_in_the_baseline_is_not_significant():
    # ppo_v2's bill_currency: the baseline right 1 of 16, the policy 0 of 16: p = 0.5, no re-rate advised
    it = next(i for i in ITEMS if i.group == "price_team" and i.probe is None)
    q = QUERIES[it.query]
    right, wrong = (domain.compose(q, domain.Style(factuality=f)) for f in ("current", "stale"))
    assert it.check(right) and not it.check(wrong)
    d = diagnose_run(SuiteRun([it], [[wrong] * 16]), baseline=SuiteRun([it], [[right] + [wrong] * 15]))
    assert d.items[0].kind == "lost_by_optimisation" and d.items[0].p_lost == pytest.approx(0.5)
    assert "0 with Fisher p < 0.05: none significant, rerun with more --n" in d.verdict and d.fixes == []
    from rich.console import Console

    c = Console(record=True, width=250)
    c.print(render_never_right(d))
    assert "lost by optimisation (not significant)" in c.export_text()


def test_greedy_accuracy_is_the_gates_number():
    # greedy: one answer per item at T=0, the same per-topic accuracy SuiteRun.per_topic gives the gates
    sampled = stub_sft_sampler(4, seed=4)
    greedy = SuiteRun(ITEMS, [[row[1]] for row in stub_sft_sampler(2, seed=5).texts])
    bgreedy = SuiteRun(ITEMS, [[row[0]] for row in stub_sft_sampler(1, seed=6).texts])
    d = diagnose_run(sampled, greedy=greedy, baseline=stub_sft_sampler(4, seed=7), baseline_greedy=bgreedy)
    gates, bg = greedy.per_topic(), bgreedy.per_topic()
    for r in d.by_topic:
        assert r.greedy_accuracy == pytest.approx(gates[r.name]["accuracy"])
        assert r.greedy_accuracy_baseline == pytest.approx(bg[r.name]["accuracy"])
        assert r.first_sample_accuracy == pytest.approx(sampled.per_topic()[r.name]["accuracy"])
    assert any(r.greedy_accuracy != r.first_sample_accuracy for r in d.by_topic)
    assert diagnose_run(sampled).by_topic[0].greedy_accuracy is None
    with pytest.raises(ValueError, match="baseline run is not on the same suite items"):
        diagnose_run(sampled, baseline=SuiteRun(ITEMS[:3], [["x"]] * 3))


def test_few_samples_misfile_rare_answers_as_gaps():
    # with 2 samples, answers the SFT model gives 38% of the time often look like gaps
    d2 = diagnose_run(stub_sft_sampler(2, seed=1))
    d16 = diagnose_run(stub_sft_sampler(16, seed=1))
    gaps2 = sum(i.kind == "knowledge_gap" for i in d2.items)
    gaps16 = sum(i.kind == "knowledge_gap" for i in d16.items)
    assert gaps2 > gaps16 + 20


def test_config_and_single_sample_errors():
    with pytest.raises(ConfigError, match="diagnose.n_samples"):
        from_dict(DiagnoseConfig, {"n_samples": 1})
    with pytest.raises(ConfigError, match="diagnose.temperature"):
        from_dict(DiagnoseConfig, {"temperature": 0})
    with pytest.raises(ConfigError, match="diagnose.alpha"):
        from_dict(DiagnoseConfig, {"alpha": 1.5})
    with pytest.raises(ValueError, match="at least 2 samples"):
        diagnose_run(SuiteRun(ITEMS[:2], [["x"], ["y"]]))


def test_diagnose_runs_a_model():
    import torch

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=96,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d, run = diagnose(tiny_gpt2(cfg, seed=0), tok, ITEMS[:4], DiagnoseConfig(n_samples=3, max_new_tokens=4),
                      baseline=(tiny_gpt2(cfg, seed=1), tok))
    assert run.correct.shape == (4, 3) and len(d.items) == 4
    assert all(i.kind == "knowledge_gap" for i in d.items)  # an untrained model knows nothing, nor its baseline
    assert all(i.baseline_right == 0 and i.p_lost == 1.0 and i.greedy_right is False for i in d.items)
    assert d.temperature == 1.0 and d.baseline == "baseline" and d.by_topic[0].greedy_accuracy == 0.0


def test_cli_diagnose(tmp_path, monkeypatch):
    import json

    import torch
    from typer.testing import CliRunner

    from preflab import cli
    from preflab.cli import app

    monkeypatch.setattr(cli.console, "width", 400)  # a wide table: not folded at the default 160 columns
    from preflab.models.tiny import train_tokenizer
    from tests.evaluate.test_gates import _save_tiny

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    ck = _save_tiny(tmp_path / "m", 0, tok)
    runner = CliRunner()
    runner.invoke(app, ["factual", "sandbox-suite", str(tmp_path / "s.jsonl"), "--n", "5"])
    res = runner.invoke(app, ["diagnose", str(ck), "--suite", str(tmp_path / "s.jsonl"), "--n", "2",
                              "--max-new-tokens", "4", "--groups"])
    assert res.exit_code == 0, res.output
    assert "verdict" in res.output
    assert json.loads((ck / "eval" / "diagnose.json").read_text())["n_samples"] == 2
    assert "greedy right (T=0" in res.output and "run with --baseline" in " ".join(res.output.split())

    base = _save_tiny(tmp_path / "b", 1, tok)
    res = runner.invoke(app, ["diagnose", str(ck), "--suite", str(tmp_path / "s.jsonl"), "--n", "2",
                              "--max-new-tokens", "4", "--baseline", str(base), "--out", str(tmp_path / "d.json")])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "d.json").read_text())
    assert js["baseline"] == str(base) and all(i["baseline_n"] == 2 for i in js["items"])
    res = runner.invoke(app, ["diagnose", str(ck), "--suite", str(tmp_path / "s.jsonl"), "--baseline",
                              str(tmp_path / "nope")])
    assert res.exit_code != 0 and "--baseline" in res.output
