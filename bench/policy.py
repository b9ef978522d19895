"""Benchmark: preflab ``train_dpo`` / ``train_ppo`` vs TRL ``DPOTrainer`` / ``RLOOTrainer`` (the benchmark workload below).

    .venv-bench/bin/python bench/policy.py [--repeats 3] [--only dpo,rl,ppo] [--out bench/results/policy.json]
    .venv/bin/python bench/policy.py --sandbox runs/base [--steps 60 --kl-target 4] --out bench/results/policy_sandbox.json

Workload: GPT-2 4 layers / 4 heads / width 256 / 256 positions /
vocab 4096, seeded random init; reference = a frozen copy; reward model = the same config
with a seeded scalar head; byte-level BPE (asked for 4096, ~1,071 learnt) on sandbox text; the 512 preference pairs
of ``bench/rm.py`` (prompts >= 48 tokens, responses >= 48 tokens + EOS). float32, 2 threads,
dropout 0, no activation checkpointing, no torch.compile, AdamW, linear decay, grad-clip 1.0.

- DPO: sigmoid, beta 0.1, batch 16, lr 1e-5, 1 epoch (32 steps). TRL evaluates the reference
  on the fly (its default); ours computes reference log-probs once before step 1 (inside the
  timed call) and the prompt once per pair. pairs/s = 512 / wall of the training call.
- online RL: 64 prompts, 16 prompts/step x 2 samples x exactly 48 new tokens (min = max = 48),
  temperature 1, reward from the seeded reward model, KL to the reference with beta 0.05, one
  update per rollout batch, lr 1e-5, 4 steps. TRL: ``RLOOTrainer`` (num_generations 2, batch 32
  completions, num_iterations 1). Ours: ``train_ppo`` with ppo_epochs 1 and one minibatch of 32
  (it also trains a value head: GAE needs it). prompts/s = 64 / wall; tokens/s = 64*2*48 / wall.
- PPO with its own defaults (4 epochs x minibatch 8 = 16 optimiser steps per rollout batch of
  32, instead of 1) on the same rollout shape, to show the extra work per sample.

Each run is a fresh subprocess, interleaved peer, ours, peer, ours ...; peak memory is the
run's VmHWM (peak RSS incl. imports) and the growth during training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from rm import _peer_fused_gelu, _vm, make_workload  # noqa: E402  (the RM benchmark's workload and helpers)

THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # --threads sets it for the workers
SETTINGS = {
    "model": "GPT-2, n_layer 4, n_head 4, n_embd 256, n_positions 256, vocab 4096, seeded random init",
    "dtype": "float32", "threads": THREADS, "dropout": 0.0, "optimizer": "AdamW", "schedule": "linear decay",
    "max_grad_norm": 1.0,
    "activation": "ours: the trainers run GPT-2's tanh-GELU through torch's fused kernel (models.hf.fuse_gelu, same values to ~2e-7); TRL: the model's own NewGELUActivation, or the fused one too with --peer-fused-gelu",
    "final_save": "every timed call ends with one resumable checkpoint (model, optimizer, RNG) and the model dir",
    "dpo": {"pairs": 512, "loss": "sigmoid", "beta": 0.1, "batch": 16, "lr": 1e-5, "epochs": 1},
    "rl": {"prompts": 64, "prompts_per_step": 16, "samples_per_prompt": 2, "new_tokens": 48, "temperature": 1.0,
           "beta": 0.05, "updates_per_rollout": 1, "lr": 1e-5, "steps": 4},
}


def make_policy(d: Path) -> None:
    """The policy (= reference) as a causal LM dir sharing the reward model's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config

    tok = AutoTokenizer.from_pretrained(d / "init")
    cfg = tiny_gpt2_config(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, n_positions=256,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tiny_gpt2(cfg, seed=0).save_pretrained(d / "policy")
    tok.save_pretrained(d / "policy")


def _prompts(d: Path) -> list[str]:
    rows = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[: SETTINGS["rl"]["prompts"]]]


# ---- workers ---------------------------------------------------------------------------


def dpo_ours(d: Path, out: Path) -> dict:
    from preflab.models.hf import load_policy
    from preflab.train.data import load_jsonl
    from preflab.train.dpo import DPOConfig, train_dpo

    pol, tok = load_policy(d / "policy")
    ref, _ = load_policy(d / "policy")
    train = load_jsonl(d / "train.jsonl")
    cfg = DPOConfig(batch_size=16, lr=1e-5, beta=0.1, epochs=1, max_length=256, checkpoint_every=10**6,
                    progress=False, cpu=True)
    rss0, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
    res = train_dpo(cfg, policy=pol, ref=ref, tokenizer=tok, train=train, run_dir=out)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "steps": res.steps, "rss_before_mb": rss0,
            # the mean over the run's steps, as TRL's training_loss is (not the last step's)
            "mean_train_loss": statistics.fmean(r["dpo/loss"] for r in res.metrics)}


def dpo_trl(d: Path, out: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from preflab.models.hf import load_policy
    from preflab.sandbox.domain import format_prompt

    pol, tok = load_policy(d / "policy")
    ref, _ = load_policy(d / "policy")
    _peer_fused_gelu(pol, ref)
    rows = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": format_prompt(r["prompt"]), "chosen": " " + r["chosen"],
                             "rejected": " " + r["rejected"]} for r in rows])
    args = TRLDPOConfig(
        output_dir=str(out), per_device_train_batch_size=16, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=1e-5, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, bf16=False, fp16=False, disable_dropout=True,
        max_length=256, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False, logging_steps=8,
        # one checkpoint at the last step and the final model dir, as train_dpo writes them when timed
        save_strategy="steps", save_steps=SETTINGS["dpo"]["pairs"] // SETTINGS["dpo"]["batch"], save_only_model=False,
        eval_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
        use_cpu=True, torch_compile=False, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=pol, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    rss0, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
    res = trainer.train()
    trainer.save_model(str(out / "policy"))
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "steps": res.global_step, "rss_before_mb": rss0,
            "mean_train_loss": res.training_loss}


def _reward_fn(d: Path):
    import torch

    from preflab.models.hf import load_reward_model
    from preflab.sandbox.domain import format_prompt
    from preflab.train.reward import score_responses

    rm, tok = load_reward_model(d / "init")
    query_of = {format_prompt(p): p for p in _prompts(d)}

    def fn(prompts, texts):
        return torch.tensor(score_responses(rm, tok, [query_of[p] for p in prompts], texts, batch_size=64))

    return fn


def _ppo(d: Path, out: Path, *, own_defaults: bool) -> dict:
    from preflab.models.hf import load_policy
    from preflab.sandbox.domain import format_prompt
    from preflab.train.ppo import PPOConfig, train_ppo

    pol, tok = load_policy(d / "policy")
    ref, _ = load_policy(d / "policy")
    rl = SETTINGS["rl"]
    shape = dict(steps=rl["steps"], prompts_per_step=rl["prompts_per_step"], samples_per_prompt=rl["samples_per_prompt"],
                 max_new_tokens=rl["new_tokens"], min_new_tokens=rl["new_tokens"], temperature=1.0,
                 kl_beta=rl["beta"], lr=rl["lr"], checkpoint_every=10**6, progress=False, cpu=True)
    if not own_defaults:
        shape.update(ppo_epochs=1, minibatch_size=rl["prompts_per_step"] * rl["samples_per_prompt"])
    cfg = PPOConfig(**shape)
    prompts = [format_prompt(p) for p in _prompts(d)]
    reward = _reward_fn(d)
    rss0, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
    res = train_ppo(cfg, policy=pol, ref=ref, tokenizer=tok, reward_fn=reward, prompts=prompts, run_dir=out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = res.metrics
    return {"wall_s": wall, "cpu_s": cpu, "steps": res.steps, "rss_before_mb": rss0,
            "rollout_s": sum(r["time/rollout_s"] for r in m), "update_s": sum(r["time/update_s"] for r in m),
            "optimizer_steps_per_rollout": cfg.ppo_epochs * -(-cfg.rollout_batch // cfg.minibatch_size),
            "final_kl": m[-1]["objective/kl"], "final_score": m[-1]["objective/scores"],
            "response_len": m[-1]["objective/response_len"]}


def rl_ours(d: Path, out: Path) -> dict:
    return _ppo(d, out, own_defaults=False)


def ppo_defaults(d: Path, out: Path) -> dict:
    return _ppo(d, out, own_defaults=True)


def rl_trl(d: Path, out: Path) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from preflab.models.hf import load_policy, load_reward_model
    from preflab.sandbox.domain import format_prompt

    pol, tok = load_policy(d / "policy")
    rm, rm_tok = load_reward_model(d / "init")
    _peer_fused_gelu(pol, rm)
    rl = SETTINGS["rl"]
    ds = Dataset.from_list([{"prompt": format_prompt(p)} for p in _prompts(d)])
    batch = rl["prompts_per_step"] * rl["samples_per_prompt"]
    args = RLOOConfig(
        output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=rl["steps"],
        num_generations=rl["samples_per_prompt"], max_completion_length=rl["new_tokens"],
        generation_kwargs={"min_new_tokens": rl["new_tokens"]}, temperature=1.0, beta=rl["beta"],
        num_iterations=1, learning_rate=rl["lr"], lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
        optim="adamw_torch", gradient_checkpointing=False, bf16=False, fp16=False, disable_dropout=True,
        logging_steps=1, eval_strategy="no", report_to=[], seed=0, data_seed=0,
        # one checkpoint at the last step and the final model dir, as train_ppo writes them when timed
        save_strategy="steps", save_steps=rl["steps"], save_only_model=False,
        dataloader_num_workers=0, use_cpu=True, torch_compile=False, disable_tqdm=True,
    )
    trainer = RLOOTrainer(model=pol, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok,
                          reward_processing_classes=rm_tok)
    rss0, t0, c0 = _vm("VmRSS"), time.perf_counter(), time.process_time()
    res = trainer.train()
    trainer.save_model(str(out / "policy"))
    lens = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "steps": res.global_step, "rss_before_mb": rss0,
            "response_len": lens[-1] if lens else None}


WORKERS = {"dpo_trl": dpo_trl, "dpo_ours": dpo_ours, "rl_trl": rl_trl, "rl_ours": rl_ours, "ppo_defaults": ppo_defaults}
GROUPS = {"dpo": ("dpo_trl", "dpo_ours"), "rl": ("rl_trl", "rl_ours"), "ppo": ("ppo_defaults",)}


def worker(kind: str, d: Path, result: Path) -> None:
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        r = WORKERS[kind](d, Path(tmp))
    hwm = _vm("VmHWM")
    rl = SETTINGS["rl"]
    r.update(kind=kind, threads=THREADS, peak_rss_mb=hwm, train_rss_delta_mb=hwm - r["rss_before_mb"],
             load_avg=os.getloadavg()[0])  # a loaded machine slows both sides unevenly: read cpu_s beside wall_s
    if kind.startswith("dpo"):
        r["pairs_per_s"] = SETTINGS["dpo"]["pairs"] / r["wall_s"]
        r["pairs_per_cpu_s"] = SETTINGS["dpo"]["pairs"] / r["cpu_s"]
    else:
        r["prompts_per_s"] = rl["prompts"] / r["wall_s"]
        r["prompts_per_cpu_s"] = rl["prompts"] / r["cpu_s"]
        r["generated_tokens_per_s"] = rl["prompts"] * rl["samples_per_prompt"] * rl["new_tokens"] / r["wall_s"]
    result.write_text(json.dumps(r, default=str))


# ---- sandbox acceptance: PPO vs SFT and vs the oracle frontier ---------------------------


def sandbox_acceptance(base: Path, out: Path, *, steps: int, kl_target: float, lr: float, n_pairs: int) -> dict:
    """PPO with the adaptive controller on the sandbox base model against a proxy reward model
    trained on gold Bradley-Terry judgements; gold and KL measured on held-out queries and set
    against the oracle frontier (gold tilt and proxy tilt)."""
    import random

    import numpy as np
    import torch

    from preflab.models.hf import load_policy
    from preflab.models.sampling import sample, sequence_logprobs
    from preflab.sandbox.domain import compose, format_prompt, generate_queries, sample_style
    from preflab.sandbox.gold import gold_prob_a_beats_b, gold_utility
    from preflab.sandbox.oracle import oracle_frontiers
    from preflab.train.data import PreferenceExample
    from preflab.train.ppo import PPOConfig, train_ppo
    from preflab.train.reward import (
        RewardConfig,
        initial_reward_model,
        score_responses,
        train_reward,
    )

    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    rng = random.Random(0)
    # 1. proxy reward model: BT judgements on the gold utility of composed answer pairs
    pairs = []
    for i, q in enumerate(generate_queries(n_pairs, seed=21, false_premise_rate=0.1)):
        a, b = compose(q, sample_style(rng)), compose(q, sample_style(rng))
        if a != b:
            w = rng.random() < gold_prob_a_beats_b(q, a, b)
            pairs.append(PreferenceExample(f"p{i}", q.text, a if w else b, b if w else a, topic=q.topic))
    rm, rm_tok = initial_reward_model(base, seed=0)
    t0 = time.perf_counter()
    rm_res = train_reward(RewardConfig(lr=1e-4, batch_size=32, epochs=1, margin="none", eval_every=0,
                                       checkpoint_every=10**6), model=rm, tokenizer=rm_tok, train=pairs[:-200],
                          val=pairs[-200:], run_dir=out / "rm", show_progress=False)
    rm_s = time.perf_counter() - t0
    rm.eval()
    train_qs = generate_queries(512, seed=22)
    query_of = {format_prompt(q.text): q.text for q in train_qs}

    def proxy(prompts, texts):
        return torch.tensor(score_responses(rm, rm_tok, [query_of.get(p, p) for p in prompts], texts, batch_size=64))

    # 2. PPO with the adaptive controller
    policy, tok = load_policy(base)
    ref, _ = load_policy(base)
    max_new = int(policy.config.n_positions) - max(len(tok(p)["input_ids"]) for p in query_of) - 1
    cfg = PPOConfig(steps=steps, prompts_per_step=16, samples_per_prompt=2, max_new_tokens=min(max_new, 96),
                    lr=lr, kl_controller="adaptive", kl_beta=0.02, kl_target=kl_target, checkpoint_every=10**6,
                    progress=False, cpu=True)
    t0 = time.perf_counter()
    res = train_ppo(cfg, policy=policy, ref=ref, tokenizer=tok, reward_fn=proxy, prompts=list(query_of),
                    run_dir=out / "ppo")
    ppo_s = time.perf_counter() - t0

    # 3. held-out gold, proxy and KL of SFT and PPO
    held = generate_queries(256, seed=23, split="heldout")
    hp = [format_prompt(q.text) for q in held]
    query_of.update({format_prompt(q.text): q.text for q in held})

    def measure(model):
        s = sample(model, tok, hp, max_new_tokens=cfg.max_new_tokens, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            lp = sequence_logprobs(model, s.input_ids, s.attention_mask, s.prompt_len)
            lr_ = sequence_logprobs(ref, s.input_ids, s.attention_mask, s.prompt_len)
        kl = ((lp - lr_) * s.response_mask).sum(-1).mean().item()
        gold = float(np.mean([gold_utility(q, t) for q, t in zip(held, s.texts, strict=True)]))
        return {"gold": gold, "proxy": float(proxy(hp, s.texts).mean()), "kl": kl}

    sft_m, ppo_m = measure(ref), measure(policy)
    # 4. the oracle frontier on held-out queries (pi_ref from the SFT model)
    fr = oracle_frontiers(ref, tok, held[:48], proxy_fn=proxy)
    g, p = fr["gold"], fr["proxy"]
    kls = [r["objective/kl"] for r in res.metrics]
    warm = len(kls) // 3
    within = [abs(k / kl_target - 1) <= 0.3 for k in kls[warm:]]
    return {
        "settings": {"steps": steps, "kl_target": kl_target, "lr": lr, "rm_pairs": len(pairs) - 200,
                     "ppo": {k: v for k, v in cfg.__dict__.items()}},
        "rm": {"val_accuracy": rm_res.metrics.get("eval/accuracy"), "seconds": rm_s},
        "ppo_seconds": ppo_s, "total_seconds": time.perf_counter() - t_start,
        "sft": sft_m, "ppo": ppo_m,
        "kl_trace": kls, "beta_trace": [r["objective/beta"] for r in res.metrics],
        "kl_within_30pct_after_warmup": float(np.mean(within)) if within else None,
        "oracle": {"gold_frontier_at_ppo_kl": g.gold_at_kl(ppo_m["kl"]),
                   "proxy_frontier_gold_at_ppo_kl": p.gold_at_kl(ppo_m["kl"]),
                   "gold_at_kl0": float(g.gold[0]),
                   "ppo_share_of_oracle_gold": ppo_m["gold"] / g.gold_at_kl(ppo_m["kl"]),
                   "ppo_fraction_of_oracle_gain": g.fraction_of_gain(ppo_m["kl"], ppo_m["gold"]),
                   "gold": g.to_dict(), "proxy": p.to_dict()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per run (the workload: 2; 1 on a "
                                                                  "busy machine, and compare cpu_s as well)")
    ap.add_argument("--only", default="dpo,rl,ppo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "policy.json"))
    ap.add_argument("--peer-fused-gelu", action="store_true", help="give TRL's models the fused activation too")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--sandbox", help="Instead: PPO on this sandbox base model vs SFT and the oracle frontier.")
    ap.add_argument("--steps", type=int, default=60, help="--sandbox only: PPO steps")
    ap.add_argument("--kl-target", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rm-pairs", type=int, default=2000)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.workdir), Path(a.result))
        return
    if a.sandbox:
        with tempfile.TemporaryDirectory() as tmp:
            r = sandbox_acceptance(Path(a.sandbox), Path(tmp), steps=a.steps, kl_target=a.kl_target, lr=a.lr,
                                   n_pairs=a.rm_pairs)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(r, indent=2, default=str) + "\n")
        print(json.dumps({k: r[k] for k in ("rm", "sft", "ppo", "kl_within_30pct_after_warmup", "total_seconds")},
                         indent=2, default=str))
        print(json.dumps({k: v for k, v in r["oracle"].items() if k not in ("gold", "proxy")}, indent=2))
        return
    import torch
    import transformers

    kinds = [k for g in a.only.split(",") for k in GROUPS[g.strip()]]
    try:
        import trl
    except ImportError:
        trl = None
        if any(k.endswith("_trl") for k in kinds):
            sys.exit("bench/policy.py: TRL is not installed; the side-by-side runs need it (pip install -e '.[bench]' "
                     "in a separate venv), or run --only ppo")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "w"
        make_workload(d)
        make_policy(d)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "BENCH_THREADS": str(a.threads),
               "TOKENIZERS_PARALLELISM": "false",
               "BENCH_PEER_FUSED_GELU": "1" if a.peer_fused_gelu else "0"}
        for i in range(a.repeats):
            for kind in kinds:  # peer first, then ours, interleaved
                res = Path(tmp) / f"{kind}{i}.json"
                p = subprocess.run([sys.executable, __file__, "--worker", kind, "--workdir", str(d), "--result",
                                    str(res)], cwd=ROOT, env=env, capture_output=True, text=True)
                if p.returncode:
                    print(f"{kind} run {i} failed:\n{p.stderr[-3000:]}", flush=True)
                    runs.append({"kind": kind, "repeat": i, "error": p.stderr[-3000:]})
                    continue
                r = json.loads(res.read_text())
                r["repeat"] = i
                runs.append(r)
                rate = f"{r['pairs_per_s']:.2f} pairs/s" if "pairs_per_s" in r else \
                    f"{r['prompts_per_s']:.2f} prompts/s, {r['generated_tokens_per_s']:.0f} tok/s"
                print(f"{kind:13s} run {i}: {rate}, wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(+{r['train_rss_delta_mb']:.0f} MB)", flush=True)
    metrics = ("wall_s", "cpu_s", "peak_rss_mb", "train_rss_delta_mb", "pairs_per_s", "pairs_per_cpu_s",
               "prompts_per_s", "prompts_per_cpu_s", "generated_tokens_per_s", "mean_train_loss")
    med = {}
    for k in kinds:
        ok = [r for r in runs if r["kind"] == k and "error" not in r]
        if ok:
            med[k] = {m: statistics.median(r[m] for r in ok) for m in metrics if m in ok[0]}
    ratio = {}
    if "dpo_trl" in med and "dpo_ours" in med:
        ratio["dpo_pairs_per_s_ours_over_trl"] = med["dpo_ours"]["pairs_per_s"] / med["dpo_trl"]["pairs_per_s"]
        ratio["dpo_pairs_per_cpu_s_ours_over_trl"] = (med["dpo_ours"]["pairs_per_cpu_s"]
                                                      / med["dpo_trl"]["pairs_per_cpu_s"])
    if "rl_trl" in med and "rl_ours" in med:
        ratio["rl_prompts_per_s_ours_over_rloo"] = med["rl_ours"]["prompts_per_s"] / med["rl_trl"]["prompts_per_s"]
        ratio["rl_prompts_per_cpu_s_ours_over_rloo"] = (med["rl_ours"]["prompts_per_cpu_s"]
                                                        / med["rl_trl"]["prompts_per_cpu_s"])
    if "ppo_defaults" in med and "rl_ours" in med:
        ratio["ppo_defaults_wall_over_rl_shape"] = med["ppo_defaults"]["wall_s"] / med["rl_ours"]["wall_s"]
    out = {"benchmark": "policy optimisation (DPO, online RL), benchmark workload",
           "settings": {**SETTINGS, "threads": a.threads, "peer_fused_gelu": a.peer_fused_gelu},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__ if trl else None,
                        "python": platform.python_version()},
           "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
                       "load_avg_per_run": [r.get("load_avg") for r in runs],
                       "note": "2 shared cores; other engineers' jobs ran concurrently, so absolute numbers drift"},
           "runs": runs, "median": med, "ratios": ratio}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"median": med, "ratios": ratio}, indent=2))


if __name__ == "__main__":
    main()
