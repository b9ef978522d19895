"""Tiny seeded reward-model fixtures shared by the reward-model tests (2-layer GPT-2, small BPE)."""

from __future__ import annotations

import functools
import random

import torch

from preflab.sandbox.domain import (
    Style,
    compose,
    format_prompt,
    generate_queries,
    sample_style,
    sft_corpus,
)
from preflab.train.data import PreferenceExample

EOS, PAD = "<|endoftext|>", "<|pad|>"


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [format_prompt(q.text) + " " + r for q, _, r in sft_corpus(400, seed=0)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token=EOS,
                                   pad_token=PAD)


def tiny_reward_model(tokenizer, *, seed: int = 0, n_layer: int = 2, n_embd: int = 64):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_layer=n_layer, n_head=2, n_embd=n_embd,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.eos_token_id)
    return GPT2ForSequenceClassification(cfg)


def tiny_policy_and_pairs(tokenizer, root, *, n_pairs: int) -> tuple:
    """A seeded 1-layer GPT-2 policy dir (with the tokenizer) and a JSONL of ``n_pairs`` sandbox pairs
    under ``root``, as a user hands them to ``rm train`` / ``rm curve``: (policy dir, data file)."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    policy = root / "policy"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_layer=1, n_head=2, n_embd=32,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                            for e in sandbox_pairs(n_pairs, seed=9)))
    return policy, data


def sandbox_pairs(n: int, *, seed: int = 0, flip: float = 0.0) -> list[PreferenceExample]:
    """Pairs whose chosen response states the current fact and rejected the stale one (a learnable
    signal); ``flip`` of them swapped at random (label noise)."""
    rng = random.Random(seed)
    out = []
    for i, q in enumerate(generate_queries(n, seed=seed, false_premise_rate=0.0)):
        s = sample_style(rng)
        good = compose(q, Style(**{**s.to_dict(), "factuality": "current"}))
        bad = compose(q, Style(**{**s.to_dict(), "factuality": "stale"}))
        if rng.random() < flip:
            good, bad = bad, good
        out.append(PreferenceExample(pair_id=f"p{i}", prompt=q.text, chosen=good, rejected=bad,
                                     strength=rng.randint(0, 3), rater=f"r{i % 3}", topic=q.topic,
                                     is_tie=rng.random() < 0.1))
    return out
