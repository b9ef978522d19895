"""Benchmark: preflab ``train_reward`` vs TRL ``RewardTrainer`` on the product's reward-model benchmark workload.

    .venv-bench/bin/python bench/rm.py [--repeats 3] [--out bench/results/rm.json]

Workload: GPT-2 4 layers / 4 heads / width 256 / 256 positions /
vocab 4096, seeded random init, scalar head; byte-level BPE (asked for 4096, ~1,071 learnt) on sandbox
text; 512 preference pairs with prompts >= 48 tokens and responses >= 48 tokens + EOS;
Bradley-Terry loss (no margin), batch 16 pairs, lr 1e-4, 1 epoch (32 steps), float32,
2 threads, dropout 0, no activation checkpointing, no torch.compile, plain AdamW,
linear decay, grad clip 1.0.

Each run is a fresh subprocess (peer, ours, peer, ours, ...), so peak memory is per run:
``peak_rss_mb`` is the process's VmHWM (peak resident set, includes imports),
``train_rss_delta_mb`` = VmHWM after training - VmRSS just before it. pairs/s = 512 /
wall time of the training call (also per CPU-second: process CPU time, steadier on a loaded machine) (ours: ``train_reward`` incl. its final checkpoint and model
save; TRL: ``trainer.train()`` with one checkpoint at the last step, then ``save_model``;
tokenisation excluded for TRL, included for ours).
Held-out accuracy: both final models score the same 256 held-out pairs (disjoint prompts)
with the same scorer. Medians of the repeats are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "model": "GPT-2, n_layer 4, n_head 4, n_embd 256, n_positions 256, vocab 4096, seeded random init, scalar head",
    "tokenizer": "byte-level BPE asked for 4096 tokens, trained on sandbox SFT text (models.tiny.train_tokenizer); "
                 "the small corpus yields about 1,071 (tokenizer_vocab); the model's embedding has 4096 rows",
    "pairs": 512, "heldout_pairs": 256, "min_prompt_tokens": 48, "min_response_tokens": 48,
    "batch_pairs": 16, "grad_accum": 1, "lr": 1e-4, "epochs": 1, "steps": 32, "dtype": "float32", "threads": 2,
    "dropout": 0.0, "gradient_checkpointing": False, "torch_compile": False, "optimizer": "AdamW(0.9, 0.999, 1e-8)",
    "weight_decay": 0.0, "schedule": "linear decay, no warmup", "max_grad_norm": 1.0, "margin": None,
    "center_rewards_coefficient": None, "loss": "-log sigmoid(r_c - r_r)", "seed": 0,
    "activation": "ours: the trainers run GPT-2's tanh-GELU through torch's fused kernel (models.hf.fuse_gelu, same values to ~2e-7); TRL: the model's own NewGELUActivation, or the fused one too with --peer-fused-gelu",
    "final_save": "both timed calls end with one resumable checkpoint (model, optimizer, RNG) and the model dir",
}


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- workload -------------------------------------------------------------------------


def make_workload(d: Path) -> None:
    """Tokenizer, initial reward model dir, train/held-out pairs (prompt as query text)."""
    import torch
    from transformers import GPT2ForSequenceClassification

    from preflab.models.tiny import tiny_gpt2_config, train_tokenizer
    from preflab.sandbox.domain import (
        Style,
        compose,
        format_prompt,
        generate_queries,
        sample_style,
        sft_corpus,
    )

    tok = train_tokenizer([format_prompt(q.text) + " " + r for q, _, r in sft_corpus(3000, seed=0)], 4096)
    n_tok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731

    def pairs(n: int, split: str, seed: int) -> list[dict]:
        rng = random.Random(seed)
        qs = generate_queries(6 * n, seed=seed, split=split, false_premise_rate=0.0)
        out = []
        for i in range(n):
            # a prompt of >= 48 tokens: earlier questions of the same conversation, then the one answered
            q, history = qs[i], []
            while n_tok(format_prompt(" ".join([*history, q.text]))) < SETTINGS["min_prompt_tokens"]:
                history.append(rng.choice(qs).text)
            prompt = " ".join([*history, q.text])
            # same style, current vs stale fact: the preference signal is the fact alone
            s = sample_style(rng).to_dict()
            chosen = compose(q, Style(**{**s, "factuality": "current"}))
            rejected = compose(q, Style(**{**s, "factuality": "stale"}))
            # responses of >= 48 tokens (+ EOS): short plain follow-up answers appended to both
            k, extra = 0, [compose(x, Style()) for x in rng.sample(qs, 8)]
            while min(n_tok(" " + chosen), n_tok(" " + rejected)) < SETTINGS["min_response_tokens"]:
                chosen, rejected, k = chosen + " " + extra[k], rejected + " " + extra[k], k + 1
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "pair_id": f"{split}{i}"})
        return out

    d.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", pairs(512, "train", 1)), ("heldout", pairs(256, "heldout", 2))):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_gpt2_config(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, n_positions=256,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.num_labels = 1
    torch.manual_seed(0)
    GPT2ForSequenceClassification(cfg).save_pretrained(d / "init")
    tok.save_pretrained(d / "init")


def workload_stats(d: Path) -> dict:
    from preflab.models.hf import load_reward_model
    from preflab.train.data import encode_example, load_jsonl

    _, tok = load_reward_model(d / "init")
    enc = [encode_example(tok, e, max_length=256) for e in load_jsonl(d / "train.jsonl")]
    p = [len(e.prompt_ids) for e in enc]
    r = [len(x) for e in enc for x in (e.chosen_ids, e.rejected_ids)]
    return {"prompt_tokens": {"min": min(p), "mean": statistics.mean(p), "max": max(p)},
            "response_tokens_incl_eos": {"min": min(r), "mean": statistics.mean(r), "max": max(r)},
            "tokenizer_vocab": len(tok), "truncated": sum(e.truncated for e in enc)}


def _peer_fused_gelu(*models) -> None:
    """--peer-fused-gelu: give TRL's models the same fused activation as ours (isolates that gain)."""
    if os.environ.get("BENCH_PEER_FUSED_GELU") == "1":
        from preflab.models.hf import fuse_gelu

        fuse_gelu(*models)


# ---- workers (one fresh process per run) ------------------------------------------------


def run_ours(d: Path, out_dir: Path, steps: int = 0) -> dict:
    from preflab.models.hf import load_reward_model
    from preflab.train.data import load_jsonl
    from preflab.train.reward import RewardConfig, train_reward

    model, tok = load_reward_model(d / "init")
    train = load_jsonl(d / "train.jsonl")
    cfg = RewardConfig(lr=1e-4, batch_size=16, grad_accum=1, epochs=1, warmup_steps=0, weight_decay=0.0,
                       max_grad_norm=1.0, margin="none", max_length=256, share_prompt=True, eval_every=0,
                       checkpoint_every=0, mixed_precision="no", seed=0, max_steps=steps)
    rss0 = _vm("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_reward(cfg, model=model, tokenizer=tok, train=train, val=[], run_dir=out_dir, show_progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "cpu_s": cpu, "steps": res.steps, "loop_pairs_per_s": rows[-1]["train/pairs_per_s"],
            "rss_before_mb": rss0, "model": model, "tok": tok}


def run_trl(d: Path, out_dir: Path, steps: int = 0) -> dict:
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from preflab.models.hf import load_reward_model
    from preflab.sandbox.domain import format_prompt

    model, tok = load_reward_model(d / "init")
    _peer_fused_gelu(model)
    rows = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    # same text as ours: format_prompt(prompt) + " " + response (+ EOS, added by TRL)
    ds = Dataset.from_list([{"prompt": format_prompt(r["prompt"]), "chosen": " " + r["chosen"],
                             "rejected": " " + r["rejected"]} for r in rows])
    args = TRLRewardConfig(
        output_dir=str(out_dir), per_device_train_batch_size=16, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, gradient_checkpointing=False,
        bf16=False, fp16=False, disable_dropout=True, max_length=256, center_rewards_coefficient=None,
        # one checkpoint (model, optimizer, scheduler, RNG) at the last step and the final model dir, as
        # ``train_reward`` writes them inside its timed call
        logging_steps=10, save_strategy="steps", save_steps=steps or SETTINGS["steps"], eval_strategy="no",
        report_to=[], seed=0, data_seed=0, save_only_model=False,
        dataloader_num_workers=0, use_cpu=True, torch_compile=False, disable_tqdm=True, max_steps=steps or -1,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    rss0 = _vm("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    trainer.save_model(str(out_dir / "model"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "steps": out.global_step, "rss_before_mb": rss0, "model": trainer.model, "tok": tok,
            "trl_settings": {k: getattr(args, k) for k in (
                "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "optim", "max_grad_norm",
                "gradient_checkpointing", "bf16", "fp16", "disable_dropout", "max_length", "torch_compile")}}


def worker(kind: str, d: Path, result: Path, threads: int = 2, steps: int = 0) -> None:
    import torch

    torch.set_num_threads(threads)
    from preflab.train.data import load_jsonl
    from preflab.train.reward import score_pairs

    with tempfile.TemporaryDirectory() as tmp:
        r = (run_ours if kind == "ours" else run_trl)(d, Path(tmp), steps)
    hwm = _vm("VmHWM")
    model, tok = r.pop("model"), r.pop("tok")
    held = load_jsonl(d / "heldout.jsonl")
    rc, rr = score_pairs(model, tok, held, batch_size=64, max_length=256)
    pairs = SETTINGS["batch_pairs"] * r["steps"]
    r.update(kind=kind, threads=threads, pairs_per_s=pairs / r["wall_s"], pairs_per_cpu_s=pairs / r["cpu_s"],
             load_avg=os.getloadavg()[0], peak_rss_mb=hwm,
             train_rss_delta_mb=hwm - r["rss_before_mb"],
             heldout_accuracy=sum(c > x for c, x in zip(rc, rr, strict=True)) / len(held))
    result.write_text(json.dumps(r, default=str))


# ---- driver ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run (the workload: 2)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the full epoch, 32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "rm.json"))
    ap.add_argument("--peer-fused-gelu", action="store_true", help="give TRL's model the fused activation too")
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.workdir), Path(a.result), a.threads, a.steps)
        return
    import torch
    import transformers

    try:
        import trl
    except ImportError:
        sys.exit("bench/rm.py: TRL is not installed; this benchmark runs TRL's RewardTrainer beside ours "
                 "(pip install -e '.[bench]' in a separate venv: docs/reward_model.md)")

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_workload(d / "w")
        stats = workload_stats(d / "w")
        print("workload:", json.dumps(stats))
        runs: list[dict] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false",
               "BENCH_PEER_FUSED_GELU": "1" if a.peer_fused_gelu else "0"}
        for i in range(a.repeats):
            for kind in ("trl", "ours"):  # peer first, then ours, interleaved
                res = d / f"{kind}{i}.json"
                subprocess.run([sys.executable, __file__, "--worker", kind, "--workdir", str(d / "w"),
                                "--result", str(res), "--threads", str(a.threads), "--steps", str(a.steps)],
                               check=True, cwd=ROOT, env=env)
                r = json.loads(res.read_text())
                r["repeat"] = i
                runs.append(r)
                print(f"{kind:4s} run {i}: {r['pairs_per_s']:.1f} pairs/s ({r['pairs_per_cpu_s']:.1f} per CPU-s, "
                      f"load {r['load_avg']:.1f}), peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"(+{r['train_rss_delta_mb']:.0f} MB in training), held-out acc {r['heldout_accuracy']:.3f}",
                      flush=True)
    med = {k: {m: statistics.median(r[m] for r in runs if r["kind"] == k)
               for m in ("pairs_per_s", "pairs_per_cpu_s", "peak_rss_mb", "train_rss_delta_mb", "heldout_accuracy",
                         "wall_s", "cpu_s")}
           for k in ("trl", "ours")}
    out = {
        "benchmark": "reward model (Bradley-Terry), benchmark workload", "workload": stats,
        "settings": {**SETTINGS, "threads": a.threads, "steps": a.steps or SETTINGS["steps"],
                     "peer_fused_gelu": a.peer_fused_gelu},
        "memory_metric": "VmHWM of the run's own process (peak RSS, incl. imports); delta = VmHWM - VmRSS before train",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "note":
                    "2 shared cores; other engineers' jobs ran concurrently, so absolute numbers drift"},
        "runs": runs, "median": med,
        "speedup_pairs_per_s": med["ours"]["pairs_per_s"] / med["trl"]["pairs_per_s"],
        "speedup_pairs_per_cpu_s": med["ours"]["pairs_per_cpu_s"] / med["trl"]["pairs_per_cpu_s"],
        "load_avg_at_start": load0,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["median"], indent=2))
    print(f"speed-up ours/TRL: {out['speedup_pairs_per_s']:.2f}x wall, {out['speedup_pairs_per_cpu_s']:.2f}x CPU -> {a.out}")


if __name__ == "__main__":
    main()
