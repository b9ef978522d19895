"""The sandbox base-model build: a loadable HF dir, deterministic, resumable, no knowledge-gap leak."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preflab.config import ConfigError
from preflab.sandbox.build import BuildConfig, build_sandbox_model, corpus_records, style_census
from preflab.sandbox.domain import KNOWLEDGE_BASE, Style, compose, generate_queries, make_query
from preflab.train.sft import train_sft

TINY = dict(corpus_size=64, tokenizer_texts=200, vocab_size=400, n_layer=2, n_head=2, n_embd=64,
            n_positions=128, steps=6, batch_size=8, warmup_steps=1, checkpoint_every=3, num_threads=1,
            progress=False)


def _build(out, **kw):
    return build_sandbox_model(BuildConfig(**{**TINY, **kw}), out, train_sft=train_sft)


def _weights(d):
    return AutoModelForCausalLM.from_pretrained(d).state_dict()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    return _build(tmp_path_factory.mktemp("base"))


def test_build_makes_a_loadable_hf_dir(built):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "corpus.jsonl", "build.json",
                 "sft/metrics.jsonl"):
        assert (built / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(built)
    tok = AutoTokenizer.from_pretrained(built)
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert model.config.n_layer == 2 and model.config.vocab_size == len(tok)
    manifest = json.loads((built / "build.json").read_text())
    assert manifest["corpus_size"] == 64 and manifest["final_loss"] is not None
    assert not list((built / "sft" / "ckpt").glob("step_*"))  # checkpoints dropped once complete
    lines = (built / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == 64 and set(json.loads(lines[0])) == {"query", "style", "prompt", "response"}


def test_same_seed_same_corpus_weights_and_samples(built, tmp_path):
    again = _build(tmp_path / "again")
    assert (again / "corpus.jsonl").read_bytes() == (built / "corpus.jsonl").read_bytes()
    wa, wb = _weights(built), _weights(again)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    queries = generate_queries(6, seed=0, split="heldout")
    texts = []
    for d in (built, again):
        model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
        texts.append(style_census(model, tok, queries, seed=3, max_new_tokens=16)["texts"])
    assert texts[0] == texts[1]
    other = corpus_records(64, seed=1)
    assert [r["response"] for r in other] != [json.loads(x)["response"]
                                             for x in (built / "corpus.jsonl").read_text().splitlines()]


def test_rerun_of_a_complete_build_is_a_no_op(built):
    before = (built / "model.safetensors").stat().st_mtime_ns
    assert _build(built) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="different config"):
        _build(built, steps=7)


def test_killed_build_resumes_to_the_same_model(built, tmp_path, monkeypatch):
    import preflab.train.checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def save_then_die(run_dir, step, **kw):
        path = real_save(run_dir, step, **kw)
        if step == 3:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "b")
    assert not (tmp_path / "b" / "model.safetensors").exists()
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    out = _build(tmp_path / "b")
    assert json.loads((out / "build.json").read_text())["resumed_from_step"] == 3
    wa, wb = _weights(built), _weights(out)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knowledge_gap_never_in_corpus(seed):
    gaps = [f for f in KNOWLEDGE_BASE if not f.in_corpus]
    assert gaps, "the domain must plant a knowledge gap"
    records = corpus_records(3000, seed=seed)
    for f in gaps:
        for value in (f.current, f.stale):
            assert not any(value in r["response"] or value in r["prompt"] for r in records)
        assert not any(r["query"]["fact_id"] == f.id for r in records)
        assert not any(f.state("vague") == s for r in records for s in [r["response"]])


def test_style_census_counts_what_the_parser_reads(monkeypatch):
    queries = generate_queries(4, seed=0, split="heldout", false_premise_rate=0.0)
    styles = [Style(tone="warm"), Style(tone="dismissive", factuality="stale"),
              Style(directness="hedged", formality="stilted"), Style()]
    texts = [compose(q, s) for q, s in zip(queries, styles, strict=True)]
    texts[3] = texts[3] + " Gibberish"  # the parser rejects it
    other_fact = next(f for f in KNOWLEDGE_BASE if f.id != queries[2].fact_id)
    texts[2] = compose(make_query(other_fact, 0, 0), styles[2])  # well-formed, but the wrong fact

    import preflab.models.sampling as sampling

    monkeypatch.setattr(sampling, "sample", lambda model, tok, prompts, **kw: SimpleNamespace(texts=texts[: len(prompts)]))
    c = style_census(None, None, queries, batch_size=10)
    assert c["parse_rate"] == 0.75
    assert c["fact_match_rate"] == 0.5
    assert c["style_share"]["tone"] == {"warm": 1 / 3, "neutral": 1 / 3, "dismissive": 1 / 3}
    assert c["style_share"]["factuality"]["stale"] == 1 / 3
    assert c["min_style_share"] == 0.0  # e.g. no 'vague' answer among the three
