"""A tiny sandbox SFT policy shared by the policy-optimisation tests (one fact, every style).

Trained once per machine and cached in pytest's cache dir (``.pytest_cache``), keyed by
``VERSION``: the first run costs ~15 s of CPU, later runs load it.
"""

from __future__ import annotations

import random

import torch

from preflab.sandbox.domain import compose, format_prompt, generate_queries, sample_style

VERSION = "policy-sft-v1"
FACT = "price_team"


def queries(n: int, *, seed: int, split: str = "train"):
    pool = [q for q in generate_queries(4 * n + 200, seed=seed, split=split, topics=("pricing",),
                                        false_premise_rate=0.0) if q.fact_id == FACT]
    return (pool * (n // max(len(pool), 1) + 1))[:n]


def build_sft(out_dir, *, steps: int = 120, seed: int = 0):
    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    rng = random.Random(seed)
    data = [(format_prompt(q.text), compose(q, sample_style(rng))) for q in queries(600, seed=seed)]
    tok = train_tokenizer([p + " " + r for p, r in data], 512)
    cfg = tiny_gpt2_config(vocab_size=len(tok), n_layer=2, n_head=4, n_embd=64, n_positions=256,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tiny_gpt2(cfg, seed=seed)
    rows = [(tok(p, add_special_tokens=False)["input_ids"],
             tok(" " + r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]) for p, r in data]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        batch = rng.sample(rows, 32)
        T = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((32, T), tok.pad_token_id)
        labels = torch.full((32, T), -100)
        mask = torch.zeros(32, T, dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def cached_sft(request):
    """Path of the cached tiny SFT policy directory (built on first use)."""
    from pathlib import Path

    torch.set_num_threads(1)
    path = Path(request.config.cache.mkdir(VERSION))
    if not (path / "model.safetensors").exists():
        build_sft(path)
    return path
