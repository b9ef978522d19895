"""A tiny tokenizer and GPT-2 for the model tests (trained once per session, well under a second)."""

from __future__ import annotations

import pytest
import torch

from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
from preflab.sandbox.domain import sandbox_texts


@pytest.fixture(scope="session")
def tok():
    return train_tokenizer(sandbox_texts(seed=0, n=300), 400)


@pytest.fixture(scope="session")
def tiny_model(tok):
    torch.set_num_threads(1)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=64, n_positions=128,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tiny_gpt2(cfg, seed=0)
