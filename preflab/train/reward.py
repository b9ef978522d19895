"""Reward-model training: Bradley-Terry with a margin, prompt computed once per pair.

    train_reward(cfg, *, model, tokenizer, train, val, run_dir, resume=False) -> RunResult

The model is any Hugging Face ``AutoModelForSequenceClassification`` with one label
(by default initialised from the SFT policy's weights: ``models.hf.reward_model_from_policy``).
Each pair is scored in one pass: the prompt runs once, its key/value cache is repeated
for the two responses, and both continuations run as one batch (``share_prompt=True``);
``share_prompt=False`` runs prompt+response twice, as TRL does. On GPT-2-family models
the last block runs only at the token the reward is read from (``pooled_last_block``). Every
variant gives the same rewards and gradients (tests/train/test_reward.py).

Run directory: ``config.json``, ``metrics.jsonl`` (``train/*``, ``eval/*``),
``ckpt/step_NNNNNN/`` (resume), ``data/{train,val}.jsonl``, ``model/`` (final HF dir).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from preflab.config import check, check_resume, field_doc, write_config
from preflab.losses.bradley_terry import MARGIN_PRESETS, bradley_terry_loss, margins_from_strength
from preflab.models.hf import fuse_gelu, warn_low_precision, write_model_meta
from preflab.models.sampling import fit_length
from preflab.train.data import (
    PROMPT_FORMATS,
    PairBatch,
    PreferenceExample,
    collate_pairs,
    encode_example,
    encode_prompt_response,
)


@dataclass
class RewardConfig:
    lr: float = field_doc(1e-4, "AdamW learning rate (linear decay to 0 after warmup)")
    batch_size: int = field_doc(16, "pairs per optimizer step (all processes together)")
    grad_accum: int = field_doc(1, "micro-batches each optimizer step is split into (divides batch_size)")
    epochs: int = field_doc(1, "passes over the training pairs")
    max_steps: int = field_doc(0, "stop after this many optimizer steps (0: run all epochs)")
    warmup_steps: int = field_doc(0, "linear warmup steps")
    weight_decay: float = field_doc(0.0, "AdamW weight decay")
    max_grad_norm: float = field_doc(1.0, "gradient clipping by global norm (0: off)")
    margin: str = field_doc("llama2_small", "margin map from rater strength: none, llama2_small, llama2_large, "
                                            "or 'constant' (use margin_constant)")
    margin_constant: float = field_doc(0.0, "the margin for every pair when margin = 'constant'")
    ties: Literal["exclude", "half"] = field_doc("exclude", "ties: 'exclude' or 'half' (trained toward 0.5)")
    lapse_rate: float = field_doc(0.0, "raters' lapse (flip) rate the loss allows for: P(label) = e + (1 - 2e) "
                                       "sigmoid(delta r - m); 0 is plain Bradley-Terry. Planted duplicates "
                                       "measure it (the quality report's flip rate)")
    max_length: int = field_doc(256, "max tokens of prompt + response")
    prompt_format: Literal["dialogue", "raw", "chat"] = field_doc(
        "dialogue", "'dialogue': format_prompt(prompt) + ' ' + response; 'raw': prompt + response (TRL); "
                    "'chat': the tokenizer's chat template around the prompt, then the response")
    share_prompt: bool = field_doc(True, "compute each prompt once and share it between chosen and rejected")
    val_fraction: float = field_doc(0.1, "share of prompts held out for validation (split by prompt)")
    eval_every: int = field_doc(50, "evaluate on the validation pairs every N steps (0: only at the end)")
    eval_batch_size: int = field_doc(32, "pairs per validation batch")
    checkpoint_every: int = field_doc(50, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = field_doc(2, "how many checkpoints keep their weights (0 = all, as PPO's keep_last)")
    mixed_precision: Literal["no", "fp16", "bf16"] = field_doc("no", "accelerate mixed precision")
    cpu: bool = field_doc(False, "force the CPU even when an accelerator is present (several launched processes "
                                 "on a machine without a GPU use it anyway)")
    seed: int = field_doc(0, "seed for data order, head init and RNG")

    def validate(self) -> None:
        w = "RewardConfig"
        check(self.lr > 0, f"{w}.lr", "must be > 0")
        check(self.batch_size >= 1, f"{w}.batch_size", "must be >= 1")
        check(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0, f"{w}.grad_accum",
              f"must be >= 1 and divide batch_size ({self.batch_size})")
        check(self.epochs >= 1, f"{w}.epochs", "must be >= 1")
        for name in ("max_steps", "warmup_steps", "eval_every", "checkpoint_every"):
            check(getattr(self, name) >= 0, f"{w}.{name}", "must be >= 0")
        check(self.keep_checkpoints >= 0, f"{w}.keep_checkpoints", "must be >= 0 (0 keeps all)")
        check(self.weight_decay >= 0 and self.max_grad_norm >= 0, f"{w}.weight_decay/max_grad_norm", "must be >= 0")
        check(self.margin in MARGIN_PRESETS or self.margin == "constant", f"{w}.margin",
              f"must be one of {[*MARGIN_PRESETS, 'constant']}, got {self.margin!r}")
        check(self.ties in ("exclude", "half"), f"{w}.ties", f"must be 'exclude' or 'half', got {self.ties!r}")
        check(0.0 <= self.lapse_rate < 0.5, f"{w}.lapse_rate", "must be in [0, 0.5)")
        check(self.max_length >= 8, f"{w}.max_length", "must be >= 8")
        check(self.prompt_format in PROMPT_FORMATS, f"{w}.prompt_format", "must be 'dialogue', 'raw' or 'chat'")
        check(0.0 <= self.val_fraction < 1.0, f"{w}.val_fraction", "must be in [0, 1)")
        check(self.eval_batch_size >= 1, f"{w}.eval_batch_size", "must be >= 1")
        check(self.mixed_precision in ("no", "fp16", "bf16"), f"{w}.mixed_precision", "must be no, fp16 or bf16")

    def __post_init__(self) -> None:
        self.validate()

    def margin_spec(self) -> str | float:
        return self.margin_constant if self.margin == "constant" else self.margin


@dataclass
class RunResult:
    run_dir: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float]  # the last train/* and eval/* values
    resumed_from: int = 0  # the checkpoint step this invocation continued from (0: a fresh run)


# ---- model ----------------------------------------------------------------------------


class PairScorer(nn.Module):
    """Wraps a sequence-classification model; ``forward`` scores k responses per prompt.

    Inputs: prompt_ids/prompt_mask (B, P) left-padded; response_ids/response_mask (kB, R)
    right-padded, rows ordered prompt-major (row k*i + j = response j of prompt i).
    Returns rewards (kB,). The reward is the head applied to the last real response token,
    as ``GPT2ForSequenceClassification`` pools it.
    """

    def __init__(self, model: nn.Module, *, share_prompt: bool = True, pooled_last_block: bool = True):
        super().__init__()
        self.model = model
        self.share_prompt = share_prompt
        self.base = getattr(model, model.base_model_prefix)
        self.head = getattr(model, "score", None)
        if self.head is None:
            raise ValueError(f"{type(model).__name__}: expected a sequence-classification model with a "
                             "`score` head (AutoModelForSequenceClassification, num_labels=1)")
        params = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # GPT-2 family: run the last block only where the reward is read (see _pooled_last_block)
        self.pooled_last_block = pooled_last_block and _supports_pooled_last_block(model)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        B = prompt_ids.shape[0]
        k = response_ids.shape[0] // B
        full_mask = torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], -1)  # (kB, P+R)
        last = response_mask.sum(-1) - 1  # (kB,) the pooled token's index in the response
        rows = torch.arange(response_ids.shape[0], device=response_ids.device)
        if not self.pooled_last_block:
            _, h, offset = self._hidden(prompt_ids, prompt_mask, response_ids, full_mask, k)
            h_last = h[rows, offset + last]  # (kB, H)
        else:  # every block but the last through the model, the last one at the pooled token only
            block = self.base.h[-1]
            with _without_last_block(self.base):
                h_prompt, x, offset = self._hidden(prompt_ids, prompt_mask, response_ids, full_mask, k)
            kv = _block_kv(block, x)
            if h_prompt is not None:  # the prompt's keys/values computed once, then repeated
                kv = torch.cat([_block_kv(block, h_prompt).repeat_interleave(k, 0), kv], 1)  # (kB, P+R, 2H)
            h_last = _pooled_last_block(block, self.base.ln_f, x[rows, offset + last], kv, full_mask,
                                        self.base.config)
        r = self.head(h_last).squeeze(-1)  # (kB,)
        return r if r.dtype == torch.float64 else r.float()  # losses in fp32 (fp64 kept for exactness tests)

    def _hidden(self, prompt_ids, prompt_mask, response_ids, full_mask, k):
        """(prompt hidden (B, P, H) or None, hidden (kB, T, H), offset of the response in T).

        Shared prompt: the prompt runs once, its cache is repeated k times and the responses
        (T = R) run on it. Otherwise prompt + response run as one sequence per row (T = P + R).
        """
        P = prompt_ids.shape[1]
        if not self.share_prompt:
            ids = torch.cat([prompt_ids.repeat_interleave(k, 0), response_ids], -1)  # (kB, P+R)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            h = self.base(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=False)
            return None, h.last_hidden_state, P
        pos_p = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        out = self.base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos_p, use_cache=True)
        cache = getattr(out, self._cache_kw, None)
        if cache is None:
            cache = out.past_key_values
        if k > 1:
            cache.batch_repeat_interleave(k)
        R = response_ids.shape[1]
        pos_r = prompt_mask.sum(-1).repeat_interleave(k)[:, None] + torch.arange(R, device=prompt_ids.device)
        h = self.base(input_ids=response_ids, attention_mask=full_mask, position_ids=pos_r,
                      use_cache=True, **{self._cache_kw: cache})
        return out.last_hidden_state, h.last_hidden_state, 0


# ---- the last block at the pooled token only (GPT-2 family) ------------------------------
# A reward model reads one hidden state per sequence: the last block's output at the last
# real token. Every other position's output of that block is discarded, so the last block
# only needs its keys and values there (c_attn on every token) and its query, attention,
# MLP and final norm at one token per row: about 3/4 of one block's work saved per token.


def _supports_pooled_last_block(model: nn.Module) -> bool:
    cfg = model.config
    base = getattr(model, model.base_model_prefix, None)
    return (getattr(cfg, "model_type", None) == "gpt2" and not getattr(cfg, "add_cross_attention", False)
            and isinstance(getattr(base, "h", None), nn.ModuleList) and len(base.h) >= 1
            and isinstance(getattr(base, "ln_f", None), nn.Module))


class _without_last_block:
    """Context manager: the base model runs its blocks but the last, and no final norm
    (``last_hidden_state`` is then the residual stream entering the last block)."""

    def __init__(self, base: nn.Module):
        self.base = base

    def __enter__(self):
        self.h, self.ln_f = self.base.h, self.base.ln_f
        self.base.h = nn.ModuleList(list(self.h)[:-1])
        self.base.ln_f = nn.Identity()

    def __exit__(self, *exc):
        self.base.h, self.base.ln_f = self.h, self.ln_f


def _block_kv(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's keys and values (..., T, 2H) from its input residual stream x (..., T, H)."""
    H = x.shape[-1]
    return block.attn.c_attn(block.ln_1(x))[..., H:]


def _pooled_last_block(block, ln_f, x_last, kv, mask, config) -> torch.Tensor:
    """ln_f(block(x))[pooled token] for a GPT-2 block: x_last (N, H) the residual stream at the
    pooled token, kv (N, T, 2H) keys/values of every position, mask (N, T) 1 = real token
    (the pooled token is each row's last real one, so causality is the padding mask)."""
    N, T, H2 = kv.shape
    H = H2 // 2
    nh = config.n_head
    d = H // nh
    scale = d ** -0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(config.n_layer)
    q = block.attn.c_attn(block.ln_1(x_last))[..., :H].view(N, nh, 1, d)
    key, value = kv.view(N, T, 2, nh, d).permute(2, 0, 3, 1, 4)  # each (N, nh, T, d)
    attn_mask = mask.bool()[:, None, None, :]  # (N, 1, 1, T)
    p_drop = block.attn.attn_dropout.p if block.training else 0.0
    a = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask, dropout_p=p_drop,
                                                         scale=scale)  # (N, nh, 1, d)
    a = block.attn.resid_dropout(block.attn.c_proj(a.reshape(N, H)))
    y = x_last + a
    y = y + block.mlp(block.ln_2(y))
    return ln_f(y)


def pair_rewards(scorer: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,)."""
    r = scorer(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask).view(-1, 2)
    return r[:, 0], r[:, 1]


@torch.no_grad()
def score_pairs(model, tokenizer, examples: Sequence[PreferenceExample], *, batch_size: int = 32,
                max_length: int = 256, prompt_format: str = "dialogue", share_prompt: bool = True,
                device=None) -> tuple[list[float], list[float]]:
    """Rewards of chosen and rejected for every example (eval mode, no grad)."""
    scorer = PairScorer(model, share_prompt=share_prompt)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    rc, rr = [], []
    max_length = fit_length(model, max_length)
    enc = [encode_example(tokenizer, e, max_length=max_length, prompt_format=prompt_format) for e in examples]
    for i in range(0, len(enc), batch_size):
        b = collate_pairs(enc[i: i + batch_size], pad_id=tokenizer.pad_token_id).to(device)
        c, r = pair_rewards(scorer, b)
        rc += c.tolist()
        rr += r.tolist()
    model.train(was_training)
    return rc, rr


@torch.no_grad()
def score_responses(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 32,
                    max_length: int = 256, prompt_format: str = "dialogue", device=None) -> list[float]:
    """The reward of each (prompt, response)."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_responses: {len(prompts)} prompts but {len(responses)} responses")
    scorer = PairScorer(model, share_prompt=False)
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    pad = tokenizer.pad_token_id
    max_length = fit_length(model, max_length)
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        enc = [encode_prompt_response(tokenizer, p, [r], max_length=max_length, prompt_format=prompt_format)
               for p, r in zip(prompts[i: i + batch_size], responses[i: i + batch_size], strict=True)]
        P = max(len(p) for p, _, _ in enc)
        R = max(len(r[0]) for _, r, _ in enc)
        pid = torch.full((len(enc), P), pad, dtype=torch.long)
        pm = torch.zeros_like(pid)
        rid = torch.full((len(enc), R), pad, dtype=torch.long)
        rm = torch.zeros_like(rid)
        for j, (p, (r,), _) in enumerate(enc):
            pid[j, P - len(p):], pm[j, P - len(p):] = torch.tensor(p), 1
            rid[j, : len(r)], rm[j, : len(r)] = torch.tensor(r), 1
        out += scorer(pid.to(device), pm.to(device), rid.to(device), rm.to(device)).tolist()
    model.train(was_training)
    return out


# ---- training -------------------------------------------------------------------------


def _write_jsonl(path: Path, examples: Sequence[PreferenceExample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for e in examples:
            fh.write(json.dumps(dataclasses.asdict(e)) + "\n")


def _batch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index lists of every optimizer step, epoch by epoch (seeded per epoch; last batch may be short)."""
    steps = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        steps += [perm[i: i + batch_size] for i in range(0, n, batch_size)]
    return steps


def _step_loss(scorer, mb: PairBatch, cfg: RewardConfig, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-pair losses of the micro-batch / ``denom`` (the step's counted pairs), and d = r_c - r_r."""
    r_c, r_r = pair_rewards(scorer, mb)
    m = margins_from_strength(mb.strength, cfg.margin_spec(), device=r_c.device)
    if any(x is not None for x in mb.margin):  # explicit per-pair margins (TRL's column) win
        explicit = torch.tensor([0.0 if x is None else x for x in mb.margin], device=r_c.device)
        has = torch.tensor([x is not None for x in mb.margin], device=r_c.device)
        m = torch.where(has, explicit, m if m is not None else torch.zeros_like(explicit))
    loss = bradley_terry_loss(r_c, r_r, m, tie_mask=mb.is_tie, ties=cfg.ties, reduction="sum",
                              lapse=cfg.lapse_rate) / denom
    return loss, (r_c - r_r).detach()


def _evaluate(scorer, encoded, cfg: RewardConfig, pad_id: int, device) -> dict[str, float]:
    scorer.eval()
    losses, correct, gaps, n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(encoded), cfg.eval_batch_size):
            b = collate_pairs(encoded[i: i + cfg.eval_batch_size], pad_id=pad_id).to(device)
            loss, d = _step_loss(scorer, b, cfg, 1.0)
            strict = ~b.is_tie
            losses += float(loss)
            correct += int(((d > 0) & strict).sum())
            gaps += float(d[strict].sum())
            n += int(strict.sum())
    scorer.train()
    n = max(n, 1)
    return {"eval/loss": losses / n, "eval/accuracy": correct / n, "eval/reward_gap": gaps / n}


# fields a resumed run may change (they do not alter the trained weights)
_RESUMABLE_CHANGES = ("eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "cpu")


def train_reward(
    cfg: RewardConfig,
    *,
    model: nn.Module,
    tokenizer,
    train: Sequence[PreferenceExample],
    val: Sequence[PreferenceExample],
    run_dir: str | Path,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    show_progress: bool = True,
    inputs: dict[str, Any] | None = None,
) -> RunResult:
    """Train ``model`` (one-label sequence classifier) on ``train`` pairs; see the module docstring.

    ``inputs``: what else the run depends on (e.g. the model it started from), recorded beside the
    data's fingerprints in ``inputs.json``; a resumed run must match them (``checkpoint.check_inputs``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from preflab.train.checkpoint import (
        check_inputs,
        fingerprint,
        latest_checkpoint,
        load_checkpoint,
        refuse_to_overwrite,
        save_checkpoint,
        truncate_jsonl,
    )
    from preflab.train.launch import make_accelerator

    if not train:
        raise ValueError("train: no training pairs")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token")
    run_dir = Path(run_dir)
    refuse_to_overwrite(run_dir, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model.config.pad_token_id = tokenizer.pad_token_id

    # ---- data: encode once; the step -> pair indices schedule is a pure function of the seed
    max_length = fit_length(model, cfg.max_length)
    enc_train = [encode_example(tokenizer, e, max_length=max_length, prompt_format=cfg.prompt_format)
                 for e in train]
    enc_val = [encode_example(tokenizer, e, max_length=max_length, prompt_format=cfg.prompt_format)
               for e in val]
    schedule = _batch_order(len(enc_train), cfg.batch_size, cfg.epochs, cfg.seed)
    total = min(len(schedule), cfg.max_steps) if cfg.max_steps else len(schedule)

    fuse_gelu(model)  # the same activation in one kernel (models.hf.fuse_gelu)
    warn_low_precision(model, "train_reward")
    scorer = PairScorer(model, share_prompt=cfg.share_prompt)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = cfg.warmup_steps

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    # ---- resume: weights, optimizer, scheduler, RNG, step (before prepare: accelerate moves state).
    # Every process reads; only the first writes (the others wait), so none reads a file mid-write.
    acc = make_accelerator(cfg, "RewardConfig")
    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        check_resume(cfg, run_dir, may_change=_RESUMABLE_CHANGES)
    check_inputs(run_dir, {"train_data": fingerprint(train), "val_data": fingerprint(val), **(inputs or {})},
                 resuming=ckpt is not None, write=acc.is_main_process)
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules={"model": model}, optimizers={"optimizer": optimizer},
                                schedulers={"scheduler": scheduler})
        start = int(state["step"])
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ckpt is not None:  # drop rows logged after the checkpoint (they are re-run)
            truncate_jsonl(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
        write_config(cfg, run_dir)
        _write_jsonl(run_dir / "data" / "train.jsonl", train)
        _write_jsonl(run_dir / "data" / "val.jsonl", val)
    acc.wait_for_everyone()
    scorer, optimizer = acc.prepare(scorer, optimizer)
    world, rank = acc.num_processes, acc.process_index
    pad_id = tokenizer.pad_token_id
    last: dict[str, float] = {}

    def log(row: dict[str, Any]) -> None:
        if acc.is_main_process:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    def checkpoint(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(run_dir, step, modules={"model": acc.unwrap_model(scorer).model},
                            optimizers={"optimizer": optimizer.optimizer if hasattr(optimizer, "optimizer")
                                        else optimizer},
                            schedulers={"scheduler": scheduler}, state={"step": step, "total": total},
                            keep_last=cfg.keep_checkpoints)
        acc.wait_for_everyone()

    scorer.train()
    micro = cfg.batch_size // cfg.grad_accum
    progress = Progress(TextColumn("rm train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not (show_progress and acc.is_local_main_process))
    t0 = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=total, completed=start, info="")
        for step in range(start, total):
            # ---- one optimizer step: this process's share of the step's pairs, in micro-batches
            idx = schedule[step]
            items = [enc_train[i] for i in idx]
            mine = items[rank::world]
            # a step with fewer pairs than processes leaves a share empty: it still joins the gradient
            # all-reduce, with one pair weighted 0 (DDP needs every process's backward)
            weight = 1.0 if mine else 0.0
            mine = mine or items[:1]
            denom = sum(1 for x in items if not (x.is_tie and cfg.ties == "exclude"))
            denom = max(denom, 1) / world  # DDP averages gradients over processes
            loss_sum, d_all = 0.0, []
            for j in range(0, len(mine), micro):
                mb = collate_pairs(mine[j: j + micro], pad_id=pad_id).to(acc.device)
                last_micro = j + micro >= len(mine)
                ctx = acc.no_sync(scorer) if (world > 1 and not last_micro) else nullcontext()
                with ctx:
                    with acc.autocast():
                        loss, d = _step_loss(scorer, mb, cfg, denom)
                    acc.backward(loss * weight)
                loss_sum += weight * float(loss.detach()) / world
                if weight:
                    d_all.append(d[~mb.is_tie])
            grad_norm = (acc.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(float("nan")))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- metrics over the step's strict pairs: sums and counts, summed over processes (their
            # shares differ in size with ties or an uneven split, so tensors cannot be gathered)
            d_cat = torch.cat(d_all) if d_all else torch.zeros(0, device=acc.device)
            sums = torch.tensor([float(d_cat.numel()), float((d_cat > 0).sum()), float(d_cat.float().sum()), loss_sum],
                                device=acc.device, dtype=torch.float64)
            if world > 1:
                sums = acc.reduce(sums, reduction="sum")
            n_strict, n_right, gap_sum, loss_sum = (float(x) for x in sums)
            done = step + 1
            row: dict[str, Any] = {
                "step": done, "train/loss": loss_sum, "train/accuracy": n_right / n_strict if n_strict else math.nan,
                "train/reward_gap": gap_sum / n_strict if n_strict else math.nan,
                "train/grad_norm": float(grad_norm), "train/lr": lr,
                "train/pairs_per_s": (done - start) * cfg.batch_size / (time.perf_counter() - t0),
            }
            if enc_val and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total):
                row.update(_evaluate(scorer, enc_val, cfg, pad_id, acc.device))
            log(row)
            last.update({k: v for k, v in row.items() if k != "step"})
            if on_step is not None:
                on_step(done, row)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total:
                checkpoint(done)
            progress.update(task, completed=done, info=f"loss {row['train/loss']:.3f}"
                            + (f" val acc {row['eval/accuracy']:.3f}" if "eval/accuracy" in row else ""))

    # ---- final model dir (HF format) and the last eval when the run was already complete
    if start >= total and enc_val:
        last.update(_evaluate(scorer, enc_val, cfg, pad_id, acc.device))
    model_dir = run_dir / "model"
    acc.wait_for_everyone()
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(scorer).model
        unwrapped.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        # how it reads its input, in the directory itself: an export or a copy scores the same
        write_model_meta(model_dir, {"kind": "reward_model", "prompt_format": cfg.prompt_format,
                                     "max_length": cfg.max_length})
    return RunResult(run_dir=run_dir, model_dir=model_dir, steps=total, metrics=last, resumed_from=start)



def initial_reward_model(path: str | Path, *, seed: int = 0):
    """(model, tokenizer) to start training from: a reward-model dir (``*ForSequenceClassification``)
    loads as is (adapting an existing RM); any other HF dir (a policy) gets a fresh seeded head."""
    from preflab.models.hf import is_reward_model, load_reward_model, reward_model_from_policy

    if (Path(path) / "config.json").is_file() and is_reward_model(path):
        return load_reward_model(path)
    return reward_model_from_policy(path, seed=seed)
