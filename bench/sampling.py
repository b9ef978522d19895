"""Our batched KV-cache sampler vs a bare KV-cache decode loop of the same model (writes JSON).

Workload (the product's online-RL rollout shape): GPT-2, 4 layers, 4 heads, width 256,
256 positions, vocab 4096, seeded random init, float32, 2 threads; 16 prompts x 2 samples
(prompts of >= 48 tokens, sandbox text), exactly 48 new tokens at temperature 1.

The bare loop is the least code that samples this batch correctly: left-padded prompt,
attention mask and position ids, the model's cache, softmax + multinomial, nothing else
(no log-probs, no EOS bookkeeping, no decoding). Runs are interleaved (bare, ours, bare,
ours, ...) because this machine drifts by tens of percent; we report medians.

    .venv/bin/python bench/sampling.py --repeats 7 --out bench/results/sampling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from preflab.models.sampling import position_ids_from_mask, sample
from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer
from preflab.sandbox.domain import format_prompt, generate_queries, sandbox_texts

N_PROMPTS, SAMPLES, NEW_TOKENS, MIN_PROMPT_TOKENS = 16, 2, 48, 48


def make_prompts(tok, n: int, seed: int) -> list[str]:
    """``n`` sandbox prompts of >= 48 tokens: several customer questions in one message."""
    qs = generate_queries(n * 8, seed=seed, split="train")
    out, i = [], 0
    while len(out) < n:
        text = qs[i].text
        i += 1
        while len(tok(format_prompt(text), add_special_tokens=False)["input_ids"]) < MIN_PROMPT_TOKENS:
            text += " Also, " + qs[i].text
            i += 1
        out.append(format_prompt(text))
    return out


@torch.no_grad()
def bare_decode(model, tok, prompts: list[str], new_tokens: int, generator: torch.Generator) -> torch.Tensor:
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in enc])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in enc])
    pos = position_ids_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    cache, logits = out.cache if getattr(out, "cache", None) is not None else out.past_key_values, out.logits[:, -1]
    pos = pos[:, -1:]
    toks = []
    for _ in range(new_tokens):
        t = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (B, 1)
        toks.append(t)
        if len(toks) == new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(t)], 1)
        pos = pos + 1
        out = model(input_ids=t, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
        cache, logits = out.cache, out.logits[:, -1]
    return torch.cat(toks, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/sampling.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = train_tokenizer(sandbox_texts(seed=0), 4096)
    cfg = tiny_gpt2_config(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, n_positions=256,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tiny_gpt2(cfg, seed=0).eval()
    prompts = [p for p in make_prompts(tok, N_PROMPTS, seed=0) for _ in range(SAMPLES)]
    prompt_tokens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    n_new = len(prompts) * NEW_TOKENS

    def ours(seed: int) -> torch.Tensor:
        return sample(model, tok, prompts, max_new_tokens=NEW_TOKENS, temperature=1.0,
                      generator=torch.Generator().manual_seed(seed), stop_at_eos=False).response_ids

    def bare(seed: int) -> torch.Tensor:
        return bare_decode(model, tok, prompts, NEW_TOKENS, torch.Generator().manual_seed(seed))

    def timed(fn, seed: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(seed)
        assert out.shape == (len(prompts), NEW_TOKENS)
        return time.perf_counter() - t0, time.process_time() - c0

    timed(bare, 0), timed(ours, 0)  # warm-up
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    cpu: dict[str, list[float]] = {"bare": [], "ours": []}
    for r in range(args.repeats):
        for name, fn in (("bare", bare), ("ours", ours)):
            w, c = timed(fn, r + 1)
            times[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "workload": {"model": "gpt2 4x256, 4 heads, 256 positions, vocab 4096, fp32", "prompts": N_PROMPTS,
                     "samples_per_prompt": SAMPLES, "new_tokens": NEW_TOKENS,
                     "prompt_tokens_min": min(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
                     "temperature": 1.0, "threads": torch.get_num_threads()},
        "seconds": times,
        "cpu_seconds": cpu,
        "median_seconds": med,
        "median_cpu_seconds": med_cpu,
        "tokens_per_s": {k: n_new / v for k, v in med.items()},
        "ours_vs_bare": med["bare"] / med["ours"],
        "ours_vs_bare_cpu": med_cpu["bare"] / med_cpu["ours"],
        "target": 0.9,
        "load_avg_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "ours_vs_bare", "ours_vs_bare_cpu", "load_avg_1m")},
                     indent=2))


if __name__ == "__main__":
    main()
