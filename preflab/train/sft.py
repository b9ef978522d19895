"""Supervised fine-tuning: next-token loss on the response tokens of (prompt, response) dialogues.

    train_sft(cfg, *, model, tokenizer, dialogues, run_dir, resume=False) -> SFTResult

A dialogue is ``prompt`` (already formatted, e.g. ``domain.format_prompt(query)``)
followed by ``" " + response + eos``. Prompt and response are tokenized separately and
concatenated, so the boundary tokenizes exactly as the sampler sees it. The loss is the
mean negative log-likelihood over response tokens (EOS included) of the batch:

    L = - sum_{i, t in response_i} log p(y_{i,t} | y_{i,<t}) / #response tokens

AdamW, linear warmup then linear decay to 0, gradient clipping, ``accelerate`` for the
device. Run directory: ``config.json``, ``metrics.jsonl`` (``train/loss``, ``train/lr``,
``train/grad_norm``, ``train/tokens``), ``ckpt/step_NNNNNN/`` (resume).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from preflab.config import check, field_doc, from_dict, seed_everything, write_config


@dataclass
class SFTConfig:
    steps: int = field_doc(300, "optimizer steps (the data is cycled in seeded epochs)")
    batch_size: int = field_doc(32, "dialogues per optimizer step")
    lr: float = field_doc(1e-3, "peak AdamW learning rate")
    warmup_steps: int = field_doc(20, "linear warmup steps, then linear decay to 0")
    weight_decay: float = field_doc(0.01, "AdamW weight decay")
    max_grad_norm: float = field_doc(1.0, "gradient clipping by global norm (0: off)")
    max_length: int = field_doc(256, "max tokens of prompt + response (longer responses are cut)")
    length_grouping: int = field_doc(8, "draw this many batches at once and batch them by length, which "
                                        "cuts padding (1: off)")
    checkpoint_every: int = field_doc(100, "save a resumable checkpoint every N steps (and at the end)")
    keep_last: int = field_doc(2, "checkpoints kept on disk")
    log_every: int = field_doc(1, "write a metrics line every N steps")
    mixed_precision: Literal["no", "fp16", "bf16"] = field_doc("no", "accelerate mixed precision")
    cpu: bool = field_doc(False, "force the CPU even when an accelerator is present")
    seed: int = field_doc(0, "seed of the data order and RNG")
    progress: bool = field_doc(True, "show a rich progress bar")

    def validate(self) -> None:
        w = "SFTConfig"
        for name in ("steps", "batch_size", "checkpoint_every", "keep_last", "log_every", "length_grouping"):
            check(getattr(self, name) >= 1, f"{w}.{name}", "must be >= 1")
        check(self.lr > 0, f"{w}.lr", "must be > 0")
        check(self.warmup_steps >= 0, f"{w}.warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, f"{w}.weight_decay", "must be >= 0")
        check(self.max_grad_norm >= 0, f"{w}.max_grad_norm", "must be >= 0")
        check(self.max_length >= 4, f"{w}.max_length", "must be >= 4")
        check(self.mixed_precision in ("no", "fp16", "bf16"), f"{w}.mixed_precision", "must be no, fp16 or bf16")

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class SFTResult:
    run_dir: Path
    steps: int
    metrics: list[dict]  # one dict per logged step (resumed steps included)
    last_checkpoint: Path | None
    resumed_from: int  # the step the run started at (0: fresh)


# ---- data -----------------------------------------------------------------------------


def encode_dialogues(tokenizer, dialogues: Sequence[tuple[str, str]], max_length: int) -> list[tuple[list[int], int]]:
    """``(ids, n_prompt)`` per dialogue: prompt ids + ids of ``" " + response + eos``."""
    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError("tokenizer: has no eos token")
    prompts = [p for p, _ in dialogues]
    responses = [" " + r + eos for _, r in dialogues]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        if not p:
            raise ValueError(f"dialogues[{i}]: empty prompt")
        if len(p) >= max_length:
            raise ValueError(f"dialogues[{i}]: prompt has {len(p)} tokens, max_length is {max_length}")
        out.append(((p + r)[:max_length], len(p)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and pad). (B, T)"""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, n_prompt) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of batch ``step``: consecutive slices of a stream of seeded per-epoch permutations.

    A pure function of its arguments, so a resumed run sees exactly the batches an
    uninterrupted one would.
    """
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(f"sft-order:{seed}:{epoch}").shuffle(perm)
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def grouped_batch_indices(lengths: Sequence[int], step: int, batch_size: int, seed: int, group: int) -> list[int]:
    """Batch ``step`` when ``group`` consecutive batches are drawn together and re-split by length.

    The ``group * batch_size`` examples of ``batch_indices(n, step // group, ...)`` are sorted
    by length, cut into ``group`` batches, and those are taken in a seeded random order
    (like HF's group_by_length). Every example is still seen once per epoch.
    """
    mega, k = divmod(step, group)
    pool = batch_indices(len(lengths), mega, batch_size * group, seed)
    pool.sort(key=lambda i: (lengths[i], i))
    chunks = [pool[j * batch_size : (j + 1) * batch_size] for j in range(group)]
    random.Random(f"sft-group:{seed}:{mega}").shuffle(chunks)
    return chunks[k]


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over labelled next tokens, number of them); logits (B, T, V), labels (B, T)."""
    targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
    logits = logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, (targets != -100).sum()


# ---- trainer --------------------------------------------------------------------------


def train_sft(
    cfg: SFTConfig | dict,
    *,
    model: torch.nn.Module,
    tokenizer,
    dialogues: Sequence[tuple[str, str]],
    run_dir: str | Path,
    resume: bool = False,
) -> SFTResult:
    """Fine-tune ``model`` in place on ``dialogues`` ((prompt, response) pairs); see the module doc.

    ``resume``: continue from the newest checkpoint in ``run_dir`` (same batches, same RNG,
    so the result equals an uninterrupted run). ``cfg`` may be a dict of SFTConfig fields.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from preflab.train.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
        truncate_jsonl,
    )
    from preflab.train.launch import make_accelerator

    if isinstance(cfg, dict):
        cfg = from_dict(SFTConfig, cfg)
    if not dialogues:
        raise ValueError("train_sft: dialogues is empty")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: has no pad token (load it with models.hf.load_policy)")
    n_pos = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if n_pos is not None and cfg.max_length > n_pos:
        raise ValueError(f"SFTConfig.max_length: {cfg.max_length} exceeds the model's {n_pos} positions")
    run_dir = Path(run_dir)
    acc = make_accelerator(cfg, "SFTConfig")
    if acc.num_processes > 1:
        raise ValueError("train_sft: runs in one process (the sandbox model is tiny); use one device")
    seed_everything(cfg.seed)
    write_config(cfg, run_dir)
    data = encode_dialogues(tokenizer, dialogues, cfg.max_length)
    lengths = [len(ids) for ids, _ in data]

    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "ln" in name or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def schedule(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.steps - i) / max(1, cfg.steps - cfg.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prepared, optimizer = acc.prepare(model, optimizer)

    metrics_path = run_dir / "metrics.jsonl"
    start, tokens_seen, history, last_ckpt = 0, 0, [], None
    if resume and (last_ckpt := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(last_ckpt, modules={"policy": acc.unwrap_model(prepared)},
                                optimizers={"optimizer": optimizer}, schedulers={"scheduler": scheduler})
        start, tokens_seen = int(state["step"]), int(state.get("tokens", 0))
        history = truncate_jsonl(metrics_path, start)
    else:
        metrics_path.unlink(missing_ok=True)

    columns = [TextColumn("sft"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn()]
    progress = Progress(*columns, disable=not cfg.progress)
    with progress, metrics_path.open("a") as log:
        task = progress.add_task("sft", total=cfg.steps, completed=start, loss=float("nan"))
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            # ---- batch + loss (token mean over the batch's response tokens) -------------------
            idx = grouped_batch_indices(lengths, step, cfg.batch_size, cfg.seed, cfg.length_grouping)
            batch = collate([data[i] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                logits = prepared(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).logits  # (B, T, V)
            nll, n_tok = response_nll(logits, batch["labels"])
            loss = nll / n_tok.clamp(min=1)
            loss_value = float(loss.detach())
            # ---- update --------------------------------------------------------------------
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            grad_norm = (acc.clip_grad_norm_(prepared.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(float("nan")))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            tokens_seen += int(n_tok)
            # ---- log + checkpoint ----------------------------------------------------------
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {"step": done, "train/loss": loss_value, "train/lr": lr, "train/grad_norm": float(grad_norm),
                       "train/tokens": tokens_seen, "time/step_s": time.perf_counter() - t0}
                history.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
            progress.update(task, completed=done, loss=loss_value)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                last_ckpt = save_checkpoint(run_dir, done, modules={"policy": acc.unwrap_model(prepared)},
                                            optimizers={"optimizer": optimizer},
                                            schedulers={"scheduler": scheduler},
                                            state={"tokens": tokens_seen}, keep_last=cfg.keep_last)
    model.eval()
    return SFTResult(run_dir, cfg.steps, history, last_ckpt, start)
