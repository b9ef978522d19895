"""Tokenizer round trip and special tokens; the tiny GPT-2 factory; the value head."""

from __future__ import annotations

import pytest
import torch

from preflab.models.heads import ValueHead
from preflab.models.tiny import EOS_TOKEN, PAD_TOKEN, tiny_gpt2, tiny_gpt2_config, train_tokenizer
from preflab.sandbox.domain import format_prompt, sandbox_texts


@pytest.mark.parametrize("text", [
    format_prompt("Hi, how much is the Team plan?") + " Hello. The Team plan costs $30 per user per month.",
    "Unseen wörds, émojis 🙂, tabs\tand  double  spaces\n",
    "",
])
def test_tokenizer_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_special_tokens_and_determinism(tok):
    assert (tok.eos_token, tok.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    ids = tok("Hello." + EOS_TOKEN, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello."
    # BPE learned merges: the domain's text takes well under one token per two bytes
    text = "Thanks so much for reaching out!"
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2
    again = train_tokenizer(sandbox_texts(seed=0, n=300), 400)
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], 100)


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd"):
        tiny_gpt2_config(vocab_size=10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        tiny_gpt2_config(vocab_size=10, n_layer=0)


def test_tiny_model_forward_and_seed(tok, tiny_model):
    ids = torch.tensor([tok("Hello. The Team plan")["input_ids"]])
    out = tiny_model(input_ids=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(out.logits).all()
    same = tiny_gpt2(tiny_model.config, seed=0)
    other = tiny_gpt2(tiny_model.config, seed=1)
    sd, sd_same, sd_other = tiny_model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert not torch.equal(sd["transformer.h.0.attn.c_attn.weight"], sd_other["transformer.h.0.attn.c_attn.weight"])


def test_value_head_shapes(tiny_model):
    head = ValueHead.for_model(tiny_model, init_std=0.02, seed=3)
    h = torch.randn(2, 5, tiny_model.config.hidden_size)
    v = head(h)
    assert v.shape == (2, 5)
    assert torch.equal(v, ValueHead.for_model(tiny_model, init_std=0.02, seed=3)(h))
    assert torch.all(ValueHead(8)(torch.randn(1, 3, 8)) == 0)  # default: zero-initialised critic
    v.sum().backward()
    assert head.summary.weight.grad is not None


def test_phrase_tokenizer_round_trip_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    texts = sandbox_texts(seed=0, n=300)
    tok = train_tokenizer(texts, 4096, granularity="phrases")
    clause = " I might be wrong about this,"
    assert len(tok(clause, add_special_tokens=False)["input_ids"]) == 1  # a whole clause is one token
    for text in ("Unseen wörds 🙂, tabs\tand  spaces\nnew line. Next!", texts[-1], ""):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(texts[-1])["input_ids"] == tok(texts[-1])["input_ids"]
    with pytest.raises(ValueError, match="granularity"):
        train_tokenizer(texts, 400, granularity="chars")


def test_value_head_fits_a_model_that_projects_its_last_hidden_state():
    """OPT-350m projects hidden_size 1024 to 512 before its LM head: the critic reads the projected state."""
    from transformers import OPTConfig, OPTForCausalLM

    m = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=1,
                                 ffn_dim=64, num_attention_heads=2, max_position_embeddings=64))
    h = m(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states[-1]
    assert h.shape[-1] == 32 and ValueHead.for_model(m)(h).shape == (1, 3)
