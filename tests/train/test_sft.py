"""SFT: response-only loss, loss goes down, resume equals an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from preflab.config import ConfigError, from_dict
from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
from preflab.sandbox.domain import format_prompt, sandbox_texts, sft_corpus
from preflab.train.sft import (
    SFTConfig,
    batch_indices,
    collate,
    encode_dialogues,
    grouped_batch_indices,
    response_nll,
    train_sft,
)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = train_tokenizer(sandbox_texts(seed=0, n=300), 400)
    dialogues = [(format_prompt(q.text), r) for q, _, r in sft_corpus(64, seed=0)]
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, dialogues, cfg


def test_encode_and_collate_mask_the_prompt(setup):
    tok, dialogues, _ = setup
    (ids, n_prompt), = encode_dialogues(tok, dialogues[:1], 128)
    prompt, response = dialogues[0]
    assert tok.decode(ids) == prompt + " " + response + tok.eos_token
    assert tok.decode(ids[:n_prompt]) == prompt
    b = collate([(ids, n_prompt), ([5, 6, 7], 1)], tok.pad_token_id)
    assert b["input_ids"].shape == (2, len(ids))
    assert (b["labels"][0, :n_prompt] == -100).all() and b["labels"][0, -1] == tok.eos_token_id
    assert b["labels"][1].tolist()[:4] == [-100, 6, 7, -100]
    assert b["attention_mask"][1].tolist()[:4] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"dialogues\[0\]: prompt has"):
        encode_dialogues(tok, dialogues[:1], 5)


def test_response_nll_hand_worked():
    # uniform logits over 4 tokens: each labelled token costs log 4; prompt/pad labels ignored
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[-100, -100, 2, 3]])
    nll, n = response_nll(logits, labels)
    assert n == 2
    torch.testing.assert_close(nll, torch.tensor(2 * torch.log(torch.tensor(4.0)).item()))


def test_batch_indices_cover_each_epoch_once():
    seen = [i for s in range(5) for i in batch_indices(10, s, 4, seed=3)]  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]
    assert batch_indices(10, 2, 4, seed=3) == seen[8:12]


def test_grouped_batches_cover_the_epoch_and_cut_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(64)]
    batches = [grouped_batch_indices(lengths, s, 8, seed=1, group=4) for s in range(8)]  # one epoch
    assert sorted(i for b in batches for i in b) == list(range(64))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    plain = [batch_indices(64, s, 8, seed=1) for s in range(8)]
    plain_spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain]
    assert sum(spread) < 0.5 * sum(plain_spread)
    assert sorted(grouped_batch_indices(lengths, 5, 8, seed=1, group=1)) == sorted(batch_indices(64, 5, 8, seed=1))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="SFTConfig.lr"):
        SFTConfig(lr=0)
    with pytest.raises(ConfigError, match="SFTConfig.stepz"):
        from_dict(SFTConfig, {"stepz": 3})


def test_max_length_beyond_positions_is_an_error(setup, tmp_path):
    tok, dialogues, mcfg = setup
    with pytest.raises(ValueError, match="SFTConfig.max_length"):
        train_sft(SFTConfig(max_length=256), model=tiny_gpt2(mcfg), tokenizer=tok, dialogues=dialogues,
                  run_dir=tmp_path)


def _run(setup, run_dir, steps, **kw):
    tok, dialogues, mcfg = setup
    model = tiny_gpt2(mcfg, seed=0)
    cfg = SFTConfig(steps=steps, batch_size=8, lr=5e-3, warmup_steps=2, checkpoint_every=4, progress=False,
                    max_length=128, **kw)
    return model, train_sft(cfg, model=model, tokenizer=tok, dialogues=dialogues, run_dir=run_dir,
                            resume=True)


def test_sft_lowers_loss_and_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    model_a, res_a = _run(setup, tmp_path / "a", 12)
    losses = [r["train/loss"] for r in res_a.metrics]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "a" / "config.json").is_file()
    assert [p.name for p in sorted((tmp_path / "a" / "ckpt").iterdir())] == ["step_000008", "step_000012"]

    # killed right after the step-8 checkpoint, with a metrics line past it, then resumed
    import preflab.train.checkpoint as ckpt

    real_save = ckpt.save_checkpoint

    def save_then_die(run_dir, step, **kw):
        path = real_save(run_dir, step, **kw)
        if step == 8:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "b", 12)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 9, "train/loss": 123.0}) + "\n")
    model_b, res_b = _run(setup, tmp_path / "b", 12)
    assert res_b.resumed_from == 8
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert [r["train/loss"] for r in lines] == pytest.approx(losses, abs=1e-6)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
