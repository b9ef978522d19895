"""Build the sandbox base model: seeded corpus -> byte-level BPE tokenizer -> tiny GPT-2 -> SFT.

    build_sandbox_model(cfg, out_dir, *, train_sft) -> Path

The output directory is a plain Hugging Face model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ...) that ``AutoModelForCausalLM`` loads, plus
``corpus.jsonl`` (the SFT dialogues, byte-identical for a seed), ``build_config.json``,
``build.json`` (what was built, corpus hash, final loss, timings) and ``sft/`` (the SFT
run: ``config.json``, ``metrics.jsonl``). Re-running on the same directory continues from
the last SFT checkpoint, and returns at once when the build is complete.

The SFT trainer is an argument (``preflab.train.sft.train_sft``): the sandbox sits beside
``train`` in the layering and does not import it. The corpus never states a fact with
``in_corpus=False`` (the planted knowledge gap).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preflab.config import ConfigError, check, field_doc, seed_everything, to_dict
from preflab.sandbox.domain import (
    FACTS,
    STYLE_AXES,
    Query,
    format_prompt,
    parse,
    sandbox_texts,
    sft_corpus,
)


@dataclass
class BuildConfig:
    seed: int = field_doc(0, "seed of the corpus, tokenizer text, weight init and data order")
    corpus_size: int = field_doc(4000, "SFT dialogues (train-split queries in the SFT style mix)")
    tokenizer_texts: int = field_doc(4000, "sampled responses added to the tokenizer's training text")
    vocab_size: int = field_doc(4096, "BPE vocabulary cap (phrases: the domain needs about 2,400)")
    tokenizer_granularity: str = field_doc("phrases", "what BPE may merge: 'phrases' (a clause can be one "
                                                      "token) or 'words' (GPT-2 style)")
    n_layer: int = field_doc(4, "transformer blocks")
    n_head: int = field_doc(4, "attention heads")
    n_embd: int = field_doc(128, "model width")
    n_positions: int = field_doc(128, "context length in tokens")
    steps: int = field_doc(1500, "SFT optimizer steps")
    batch_size: int = field_doc(32, "SFT dialogues per step")
    lr: float = field_doc(3e-3, "SFT peak learning rate (AdamW, warmup then linear decay)")
    warmup_steps: int = field_doc(20, "SFT warmup steps")
    weight_decay: float = field_doc(0.01, "SFT AdamW weight decay")
    checkpoint_every: int = field_doc(250, "SFT checkpoint interval (resume granularity)")
    num_threads: int = field_doc(1, "torch CPU threads during the build (0: leave torch's default); a second "
                                    "thread does not pay off on a model this small, and on a loaded machine "
                                    "it made SFT steps 40x slower (docs/models.md)")
    progress: bool = field_doc(True, "show a rich progress bar")

    def validate(self) -> None:
        w = "BuildConfig"
        for name in ("corpus_size", "n_layer", "n_head", "n_embd", "steps", "batch_size", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"{w}.{name}", "must be >= 1")
        for name in ("tokenizer_texts", "warmup_steps", "num_threads"):
            check(getattr(self, name) >= 0, f"{w}.{name}", "must be >= 0")
        check(self.vocab_size >= 258, f"{w}.vocab_size", "must be >= 258 (256 bytes + eos + pad)")
        check(self.tokenizer_granularity in ("phrases", "words"), f"{w}.tokenizer_granularity",
              f"must be 'phrases' or 'words', got {self.tokenizer_granularity!r}")
        check(self.n_embd % self.n_head == 0, f"{w}.n_embd", f"must be divisible by n_head ({self.n_head})")
        check(self.n_positions >= 32, f"{w}.n_positions", "must be >= 32")
        check(self.lr > 0, f"{w}.lr", "must be > 0")
        check(self.weight_decay >= 0, f"{w}.weight_decay", "must be >= 0")

    def __post_init__(self) -> None:
        self.validate()

    def sft_fields(self) -> dict[str, Any]:
        """The SFTConfig fields this build sets (the rest keep SFTConfig's defaults)."""
        return {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "warmup_steps": self.warmup_steps, "weight_decay": self.weight_decay,
                "max_length": self.n_positions, "checkpoint_every": self.checkpoint_every,
                "keep_last": 1, "seed": self.seed, "progress": self.progress, "cpu": True}


# ``train_sft(sft_config_fields, *, model, tokenizer, dialogues, run_dir, resume)``; the
# first argument is a dict of SFTConfig fields (``preflab.train.sft.train_sft`` accepts it).
TrainSFT = Callable[..., Any]


# ---- corpus ---------------------------------------------------------------------------


def corpus_records(size: int, *, seed: int) -> list[dict[str, Any]]:
    """The SFT dialogues as JSON-able records (query, style, prompt, response)."""
    out = []
    for q, style, response in sft_corpus(size, seed=seed):
        if not FACTS[q.fact_id].in_corpus:  # the knowledge gap must stay a gap
            raise AssertionError(f"sft_corpus stated the knowledge-gap fact {q.fact_id!r}")
        out.append({"query": q.to_dict(), "style": style.to_dict(), "prompt": format_prompt(q.text),
                    "response": response})
    return out


def write_corpus(records: Sequence[dict[str, Any]], path: Path) -> str:
    """Write ``records`` as JSONL (sorted keys, ``\\n`` line ends); return the file's sha256."""
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def tokenizer_texts(seed: int, n: int) -> list[str]:
    """``domain.sandbox_texts`` with each response preceded by the space it has in a dialogue."""
    return [t if t.startswith("User: ") else " " + t for t in sandbox_texts(seed=seed, n=n)]


# ---- build ----------------------------------------------------------------------------


def build_sandbox_model(cfg: BuildConfig, out_dir: str | Path, *, train_sft: TrainSFT) -> Path:
    """Build (or finish building) the sandbox base model into ``out_dir``; return ``out_dir``."""
    import torch

    from preflab.models.tiny import tiny_gpt2, tiny_gpt2_config, train_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "build_config.json"
    cfg_json = json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"
    if cfg_path.exists() and _without_progress(cfg_path.read_text()) != _without_progress(cfg_json):
        raise ConfigError(f"{out}: holds a build with a different config ({cfg_path}); use another --out")
    if (out / "build.json").exists() and (out / "model.safetensors").exists():
        return out  # complete
    cfg_path.write_text(cfg_json)

    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        seed_everything(cfg.seed)
        # ---- corpus + tokenizer (cheap, deterministic: rebuilt on resume, checked against disk)
        records = corpus_records(cfg.corpus_size, seed=cfg.seed)
        corpus_sha = write_corpus(records, out / "corpus.jsonl")
        tok_dir = out / "sft" / "tokenizer"
        if (tok_dir / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tokenizer = train_tokenizer(tokenizer_texts(cfg.seed, cfg.tokenizer_texts), cfg.vocab_size,
                                        granularity=cfg.tokenizer_granularity)
            tokenizer.save_pretrained(tok_dir)
        t_data = time.perf_counter() - t0
        # ---- model + SFT (resumes from out/sft/ckpt)
        model = tiny_gpt2(tiny_gpt2_config(
            vocab_size=len(tokenizer), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
            n_positions=cfg.n_positions, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id), seed=cfg.seed)
        dialogues = [(r["prompt"], r["response"]) for r in records]
        result = train_sft(cfg.sft_fields(), model=model, tokenizer=tokenizer, dialogues=dialogues,
                           run_dir=out / "sft", resume=True)
        # ---- save a plain Hugging Face directory, then the manifest that marks it complete
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        max_response = max(len(tokenizer(" " + r["response"], add_special_tokens=False)["input_ids"])
                           for r in records) + 1
        metrics = getattr(result, "metrics", []) or []
        manifest = {
            "seed": cfg.seed, "corpus_sha256": corpus_sha, "corpus_size": len(records),
            "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
            "max_response_tokens": max_response, "sft_steps": cfg.steps,
            # the mean of the last 50 steps: one batch's loss swings by +-0.3 (0.71 then 1.21)
            "final_loss": (sum(r["train/loss"] for r in metrics[-50:]) / len(metrics[-50:])) if metrics else None,
            "final_loss_last_step": metrics[-1]["train/loss"] if metrics else None,
            "resumed_from_step": getattr(result, "resumed_from", 0),
            "seconds_data": round(t_data, 2), "seconds_total_this_run": round(time.perf_counter() - t0, 2),
            "torch_threads": torch.get_num_threads(),
        }
        (out / "build.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for ckpt in (out / "sft" / "ckpt").glob("step_*"):  # done: the HF dir replaces the checkpoint
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        torch.set_num_threads(old_threads)
    return out


def _without_progress(text: str) -> dict:
    d = json.loads(text)
    d.pop("progress", None)
    return d


# ---- what the model writes ------------------------------------------------------------


def style_census(
    model,
    tokenizer,
    queries: Sequence[Query],
    *,
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 96,
    batch_size: int = 50,
) -> dict[str, Any]:
    """Sample one response per query and count what ``domain.parse`` recovers (no gold).

    Returns ``parse_rate`` (share of responses the parser accepts), ``fact_match_rate``
    (share whose stated fact is the query's fact), ``style_share`` (per axis, the share of
    parsed responses with each value), ``premise_agree_rate`` (false-premise queries
    answered "Yes, that's right."), and the texts.
    """
    import torch

    from preflab.models.sampling import max_positions, sample

    gen = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    limit = max_positions(model)
    for i in range(0, len(queries), batch_size):
        prompts = [format_prompt(q.text) for q in queries[i : i + batch_size]]
        room = max_new_tokens
        if limit is not None:  # a long prompt leaves fewer positions for the response
            longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
            room = max(1, min(max_new_tokens, limit - longest))
        s = sample(model, tokenizer, prompts, max_new_tokens=room, temperature=temperature, generator=gen)
        texts.extend(s.texts)
    parsed = [parse(t) for t in texts]
    ok = [(q, p) for q, p in zip(queries, parsed, strict=True) if p is not None]
    n = len(queries)
    share = {axis: {v: (sum(getattr(p.style, axis) == v for _, p in ok) / len(ok) if ok else 0.0)
                    for v in values} for axis, values in STYLE_AXES.items()}
    premise = [p for q, p in ok if q.false_premise is not None]
    return {
        "n": n,
        "parse_rate": len(ok) / n if n else 0.0,
        "fact_match_rate": sum(p.fact_id == q.fact_id for q, p in ok) / n if n else 0.0,
        "style_share": share,
        "min_style_share": min(v for axis in ("tone", "directness", "factuality", "formality")
                               for v in share[axis].values()),
        "premise_agree_rate": (sum(bool(p.agrees_with_premise) for p in premise) / len(premise)
                               if premise else None),
        "texts": texts,
    }
