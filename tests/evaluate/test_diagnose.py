"""diagnose separates a knowledge gap (never right in n) from a preference problem (sometimes right)."""

from __future__ import annotations

import random

import pytest

from preflab.config import ConfigError, from_dict
from preflab.evaluate.diagnose import (
    DiagnoseConfig,
    classify,
    diagnose,
    diagnose_run,
    render_tables,
)
from preflab.evaluate.factual import SuiteRun, item_from_dict
from preflab.sandbox import domain
from preflab.sandbox.factual_suite import build_suite

ITEMS = [item_from_dict(d, "suite") for d in build_suite(150)]
QUERIES = {q.text: q for q in domain.all_queries()}


def stub_sft_sampler(n: int, seed: int = 0) -> SuiteRun:
    """Stands in for the sandbox SFT model: the SFT style mix, and for a fact the corpus never
    states (in_corpus=False) it can only guess a stale or vague value."""
    rng = random.Random(seed)
    texts = []
    for it in ITEMS:
        q = QUERIES[it.query]
        row = []
        for _ in range(n):
            s = domain.sample_style(rng)
            if not domain.FACTS[q.fact_id].in_corpus and s.factuality == "current":
                s = domain.Style(**{**s.to_dict(), "factuality": rng.choice(["stale", "vague"])})
            row.append(domain.compose(q, s))
        texts.append(row)
    return SuiteRun(ITEMS, texts)


def test_classify():
    assert [classify(0, 16), classify(3, 16), classify(16, 16)] == ["knowledge_gap", "preference", "ok"]


def test_separates_planted_gap_from_stale_price_preference_problem():
    d = diagnose_run(stub_sft_sampler(16))
    groups = {r.name: r for r in d.by_group}
    assert groups["price_scale"].knowledge_gap == groups["price_scale"].items > 0
    for g in ("price_team", "price_starter", "price_business"):
        assert groups[g].knowledge_gap == 0 and groups[g].preference > 0
        assert groups[g].any_of_n_accuracy == 1.0 > groups[g].first_sample_accuracy
    pricing = next(r for r in d.by_topic if r.name == "pricing")
    assert pricing.knowledge_gap == groups["price_scale"].items
    assert "wholly missing: price_scale" in d.verdict and "preference problems RLHF can fix" in d.verdict
    assert d.kind_of(next(i.id for i in ITEMS if i.group == "price_scale")) == "knowledge_gap"
    from rich.console import Console

    c = Console(record=True, width=160)
    c.print(render_tables(d))
    c.print(render_tables(d, groups=True))
    assert "price_scale" in c.export_text()
    assert d.to_dict()["by_topic"][0]["name"] == "account"


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
    with pytest.raises(ValueError, match="at least 2 samples"):
        diagnose_run(SuiteRun(ITEMS[:2], [["x"], ["y"]]))


def test_diagnose_runs_a_model():
    import torch

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(domain.sandbox_texts(n=100), 300)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=96,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d, run = diagnose(tiny_gpt2(cfg, seed=0), tok, ITEMS[:4], DiagnoseConfig(n_samples=3, max_new_tokens=4))
    assert run.correct.shape == (4, 3) and len(d.items) == 4
    assert all(i.kind == "knowledge_gap" for i in d.items)  # an untrained model knows nothing


def test_cli_diagnose(tmp_path):
    import json

    import torch
    from typer.testing import CliRunner

    from preflab.cli import app
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
