"""train_dpo: the shared-prompt forward against a plain forward, metrics, ties, IPO; gold win rate on the sandbox."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from preflab.config import ConfigError
from preflab.sandbox.domain import (
    Style,
    compose,
    format_prompt,
    generate_queries,
    sample_style,
    sandbox_texts,
)
from preflab.train.data import PreferenceExample, collate_pairs, encode_example
from preflab.train.dpo import DPOConfig, pair_logprobs, train_dpo

from .policy_fixtures import cached_sft, queries


@pytest.fixture(scope="module")
def tiny():
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    torch.set_num_threads(1)
    tok = train_tokenizer(sandbox_texts(n=200), 320)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=512,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, lambda seed=0: tiny_gpt2(cfg, seed=seed)


def _pairs(n, seed=0, tie_every=0):
    rng = random.Random(seed)
    out = []
    for i, q in enumerate(generate_queries(n, seed=seed)):
        s = sample_style(rng)
        good = compose(q, Style(**{**s.to_dict(), "tone": "warm"}))
        bad = compose(q, Style(**{**s.to_dict(), "tone": "dismissive"}))
        out.append(PreferenceExample(f"p{i}", q.text, good, bad, is_tie=bool(tie_every and i % tie_every == 0)))
    return out


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="DPOConfig.beta"):
        DPOConfig(beta=0)
    with pytest.raises(ConfigError, match="DPOConfig.label_smoothing"):
        DPOConfig(loss="ipo", label_smoothing=0.1)


def test_shared_prompt_forward_equals_plain_forward(tiny):
    from preflab.models.sampling import sequence_logprobs

    tok, make = tiny
    model = make(1)
    enc = [encode_example(tok, ex, max_length=512) for ex in _pairs(4, seed=2)]
    b = collate_pairs(enc, pad_id=tok.pad_token_id)
    with torch.no_grad():
        ch, rj = pair_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
        for i, e in enumerate(enc):
            for got, resp in ((ch[i], e.chosen_ids), (rj[i], e.rejected_ids)):
                ids = torch.tensor([e.prompt_ids + resp])
                want = sequence_logprobs(model, ids, torch.ones_like(ids), len(e.prompt_ids)).sum()
                assert float(got) == pytest.approx(float(want), abs=1e-3)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_learns_the_preference_and_writes_its_run(tmp_path, tiny, loss):
    tok, make = tiny
    data = _pairs(40, tie_every=10)
    cfg = DPOConfig(batch_size=8, lr=1e-3, epochs=2, checkpoint_every=4, progress=False, loss=loss, max_length=512)
    res = train_dpo(cfg, policy=make(0), ref=make(0), tokenizer=tok, train=data[:32], val=data[32:],
                    run_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == res.metrics and [r["step"] for r in rows] == list(range(1, 9))  # 28 non-tie pairs / 8 -> 4 per epoch
    assert rows[0]["data/ties_skipped"] == 4
    assert rows[0]["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    if loss == "sigmoid":
        assert rows[0]["dpo/loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert rows[-1]["dpo/accuracy"] == 1.0 and rows[-1]["val/accuracy"] == 1.0
    assert rows[-1]["val/reward_margin"] > 0 and "val/loss" in rows[3]
    assert (tmp_path / "ref_logprobs.pt").exists() and (tmp_path / "policy" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000004", "step_000008"]
    if loss == "sigmoid":  # the last checkpoint, exported, is the final policy
        from preflab.models.hf import load_policy
        from preflab.train.checkpoint import export_checkpoint

        export_checkpoint(tmp_path / "ckpt" / "step_000008", tmp_path / "policy", tmp_path / "exported")
        a, b = (load_policy(d)[0].state_dict() for d in (tmp_path / "exported", tmp_path / "policy"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_config_and_changes_nothing(tmp_path, tiny):
    tok, make = tiny
    data = _pairs(16)
    cfg = DPOConfig(batch_size=8, lr=1e-3, checkpoint_every=1, progress=False, max_length=512)
    train_dpo(cfg, policy=make(0), ref=make(0), tokenizer=tok, train=data, run_dir=tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path).iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"DPOConfig\.beta: 0\.5 differs from 0\.1 in .*config\.json"):
        train_dpo(DPOConfig(**{**cfg.__dict__, "beta": 0.5}), policy=make(0), ref=make(0), tokenizer=tok,
                  train=data, run_dir=tmp_path, resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path).iterdir() if p.is_file()} == before
    # fields that do not change the weights may differ (here: checkpoint cadence and progress bar)
    res = train_dpo(DPOConfig(**{**cfg.__dict__, "checkpoint_every": 5, "progress": True}), policy=make(0),
                    ref=make(0), tokenizer=tok, train=data, run_dir=tmp_path, resume=True)
    assert res.steps == 2


def test_the_evaluation_hook_runs_at_every_checkpoint(tmp_path, tiny):
    tok, make = tiny
    seen = []

    def hook(step, policy):
        seen.append((step, policy.training))
        return {"eval/n_params": sum(p.numel() for p in policy.parameters())}

    train_dpo(DPOConfig(batch_size=8, lr=1e-3, checkpoint_every=1, progress=False, max_length=512), policy=make(0),
              ref=make(0), tokenizer=tok, train=_pairs(16), run_dir=tmp_path, eval_hook=hook)
    assert seen == [(1, False), (2, False)]  # evaluated in eval mode
    rows = [json.loads((tmp_path / "eval" / f"step_{s:06d}.json").read_text()) for s in (1, 2)]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["eval/n_params"] > 0


def test_all_ties_is_a_clear_error(tmp_path, tiny):
    tok, make = tiny
    with pytest.raises(ValueError, match="no non-tie pairs"):
        train_dpo(DPOConfig(progress=False), policy=make(), ref=make(), tokenizer=tok,
                  train=_pairs(3, tie_every=1), run_dir=tmp_path)


@pytest.mark.slow
def test_dpo_on_gold_judgements_beats_sft(tmp_path, request):
    from preflab.models.hf import load_policy
    from preflab.models.sampling import sample
    from preflab.sandbox.gold import gold_prob_a_beats_b, gold_utility

    sft_dir = cached_sft(request)
    rng = random.Random(0)
    train = []
    for i, q in enumerate(queries(320, seed=11)):  # simulated judgements: Bradley-Terry on the gold utility
        a, b = compose(q, sample_style(rng)), compose(q, sample_style(rng))
        if a == b:
            continue
        a_wins = rng.random() < gold_prob_a_beats_b(q, a, b)
        train.append(PreferenceExample(f"p{i}", q.text, a if a_wins else b, b if a_wins else a))
    policy, tok = load_policy(sft_dir)
    ref, _ = load_policy(sft_dir)
    # pure DPO (rpo_alpha=0) on this 2-layer model lowers the share of well-formed answers (0.73 -> 0.3 at
    # this lr); the RPO term keeps it, as on real models (Pang et al. 2024)
    train_dpo(DPOConfig(batch_size=16, lr=5e-4, epochs=2, beta=0.1, rpo_alpha=1.0, progress=False), policy=policy, ref=ref,
              tokenizer=tok, train=train, run_dir=tmp_path)
    sft, _ = load_policy(sft_dir)
    qs = queries(128, seed=5, split="heldout")
    prompts = [format_prompt(q.text) for q in qs]
    gen = {name: sample(m, tok, prompts, max_new_tokens=80, generator=torch.Generator().manual_seed(3)).texts
           for name, m in (("dpo", policy), ("sft", sft))}
    g_dpo = np.array([gold_utility(q, t) for q, t in zip(qs, gen["dpo"], strict=True)])
    g_sft = np.array([gold_utility(q, t) for q, t in zip(qs, gen["sft"], strict=True)])
    win_rate = float(np.mean((g_dpo > g_sft) + 0.5 * (g_dpo == g_sft)))
    assert win_rate > 0.6 and g_dpo.mean() > g_sft.mean() + 0.5, (win_rate, g_dpo.mean(), g_sft.mean())
