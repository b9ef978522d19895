"""DPO / IPO from judged pairs, one visible loop; the prompt is computed once per pair.

Each pair's prompt goes through the model once (with the KV cache kept); the cache is
repeated for the two responses, which then run as one batch of 2B rows. Reference
log-probs are computed once for the whole training set before the first step (and saved
in the run dir, so a resumed run does not recompute them). Ties carry no DPO signal and
are skipped (counted in ``data/ties_skipped``).

Metric keys: ``dpo/loss``, ``dpo/reward_margin`` (mean of beta * log-ratio chosen minus
rejected), ``dpo/accuracy`` (share of pairs with a positive implicit margin),
``dpo/chosen_reward``, ``dpo/rejected_reward``, ``train/lr``, ``time/step_s``; at each
checkpoint and at the end, when ``val`` is given: ``val/loss``, ``val/accuracy``,
``val/reward_margin``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from preflab.config import check, check_resume, field_doc, seed_everything, write_config
from preflab.losses.dpo import PreferenceLoss, dpo_loss, ipo_loss
from preflab.models.hf import fuse_gelu, warn_low_precision
from preflab.models.sampling import fit_length
from preflab.train.data import PairBatch, PreferenceExample, collate_pairs, encode_example
from preflab.train.ppo import RunResult


@dataclass
class DPOConfig:
    """DPO settings; defaults run the sandbox on a CPU."""

    seed: int = field_doc(0, "Seed of the pair order.")
    epochs: int = field_doc(1, "Passes over the training pairs.")
    batch_size: int = field_doc(16, "Pairs per optimiser step (global, over all processes).")
    lr: float = field_doc(1e-5, "AdamW learning rate.")
    lr_schedule: Literal["constant", "linear"] = field_doc("linear", "Learning-rate schedule (linear decays to 0).")
    weight_decay: float = field_doc(0.0, "AdamW weight decay.")
    max_grad_norm: float = field_doc(1.0, "Gradient-norm clip (0: off).")
    loss: Literal["sigmoid", "ipo"] = field_doc("sigmoid", "DPO sigmoid loss (Rafailov et al. 2023) or IPO (Azar et al. 2023).")
    beta: float = field_doc(0.1, "beta of DPO (tau of IPO): strength of the leash to the reference.")
    label_smoothing: float = field_doc(0.0, "cDPO label smoothing (share of labels assumed flipped).")
    rpo_alpha: float = field_doc(0.0, "Weight of the chosen responses' per-token NLL added to the loss (RPO, Pang et al. 2024); keeps DPO from pushing mass off well-formed text.")
    max_length: int = field_doc(256, "Prompt + response tokens kept per pair.")
    prompt_format: Literal["dialogue", "raw", "chat"] = field_doc(
        "dialogue", "Wrap prompts in the dialogue format ('User: ...\\nAssistant:'), use them raw, or apply the "
                    "tokenizer's chat template ('chat').")
    checkpoint_every: int = field_doc(500, "Save a checkpoint every N optimiser steps.")
    keep_last: int = field_doc(2, "Checkpoints kept on disk (0: all).")
    eval_batch_size: int = field_doc(32, "Pairs per forward when computing reference / validation log-probs.")
    mixed_precision: Literal["no", "fp16", "bf16"] = field_doc("no", "accelerate mixed precision.")
    cpu: bool = field_doc(False, "Force the CPU even when an accelerator is present.")
    progress: bool = field_doc(True, "Show a rich progress bar.")

    def validate(self) -> None:
        w = "DPOConfig"
        for name in ("epochs", "batch_size", "max_length", "checkpoint_every", "eval_batch_size"):
            check(getattr(self, name) >= 1, f"{w}.{name}", "must be >= 1")
        check(self.lr > 0, f"{w}.lr", "must be > 0")
        check(self.beta > 0, f"{w}.beta", "must be > 0")
        check(0 <= self.label_smoothing < 0.5, f"{w}.label_smoothing", "must be in [0, 0.5)")
        check(self.loss == "sigmoid" or self.label_smoothing == 0, f"{w}.label_smoothing",
              "only applies to the sigmoid loss")
        check(self.max_grad_norm >= 0, f"{w}.max_grad_norm", "must be >= 0")
        check(self.rpo_alpha >= 0, f"{w}.rpo_alpha", "must be >= 0")
        check(self.keep_last >= 0, f"{w}.keep_last", "must be >= 0")

    def __post_init__(self) -> None:
        self.validate()


class PairLogprobs(torch.nn.Module):
    """Summed log-probs of chosen and rejected responses, the prompt computed once per pair.

    One module around the policy so that ``accelerate``/DDP sees a single forward per step.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logprobs(self.model, prompt_ids, prompt_mask, response_ids, response_mask)


def pair_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs, each (B,), for a ``PairBatch``'s tensors.

    prompt (B, P) left-padded -> one forward with the KV cache; the cache is repeated for the
    two responses (2B, R) right-padded, rows 2i / 2i+1 = chosen / rejected of pair i.
    """
    from preflab.models.sampling import _cache_kw, _cache_of, position_ids_from_mask

    pos = position_ids_from_mask(prompt_mask)  # (B, P)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    cache = _cache_of(out)
    cache.batch_repeat_interleave(2)
    first = out.logits[:, -1].repeat_interleave(2, 0)  # (2B, V): predicts response token 0
    R = response_ids.shape[1]
    full_mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], dim=1)  # (2B, P + R)
    rpos = pos[:, -1:].repeat_interleave(2, 0) + 1 + torch.arange(R, device=pos.device)  # (2B, R)
    out2 = model(input_ids=response_ids, attention_mask=full_mask, position_ids=rpos, use_cache=True,
                 **{_cache_kw(model): cache})
    # out2's position t predicts token t + 1; its last position predicts nothing (a placeholder
    # target keeps the logits contiguous instead of copying all but the last position)
    targets = torch.cat([response_ids[:, 1:], response_ids[:, :1]], dim=1)
    tok_lp = torch.cat([token_logprobs(first[:, None], response_ids[:, :1]),  # (2B, R)
                        token_logprobs(out2.logits, targets)[:, :-1]], dim=1)
    seq = (tok_lp * response_mask).sum(-1)  # (2B,)
    return seq[0::2], seq[1::2]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position: logits (N, T, V), targets (N, T) -> (N, T), in fp32.

    One fused log-softmax + gather (``cross_entropy``), which is faster and keeps less for the
    backward pass than ``gather - logsumexp``.
    """
    N, T, V = logits.shape
    return -torch.nn.functional.cross_entropy(logits.float().reshape(N * T, V), targets.reshape(N * T),
                                              reduction="none").view(N, T)


def preference_loss(cfg: DPOConfig, pc, pr, rc, rr) -> PreferenceLoss:
    if cfg.loss == "ipo":
        return ipo_loss(pc, pr, rc, rr, beta=cfg.beta)
    return dpo_loss(pc, pr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing)


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _all_logprobs(model, encoded, pad_id: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of every encoded pair, in order."""
    ch, rj = [], []
    for r in _batches(len(encoded), batch_size):
        b = collate_pairs([encoded[i] for i in r], pad_id=pad_id).to(device)
        c, j = pair_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)
        ch.append(c.float().cpu())
        rj.append(j.float().cpu())
    return torch.cat(ch), torch.cat(rj)


def train_dpo(
    cfg: DPOConfig,
    *,
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    tokenizer,
    train: Sequence[PreferenceExample],
    val: Sequence[PreferenceExample] | None = None,
    run_dir: str | Path,
    resume: bool = False,
    inputs: dict[str, Any] | None = None,
    eval_hook: Callable[[int, torch.nn.Module], dict] | None = None,
) -> RunResult:
    """Fit ``policy`` to the preference pairs ``train`` with DPO/IPO against the frozen ``ref``.

    A resumed run must train on the same pairs and ``inputs`` (e.g. the policy's path; ``inputs.json``).
    ``eval_hook(step, policy) -> dict`` runs at every checkpoint, as in ``train_ppo``; its numbers go to
    ``run_dir/eval/step_NNNNNN.json`` (``preflab checkpoints`` lists them)."""
    from rich.progress import Progress

    from preflab.train.checkpoint import (
        check_inputs,
        fingerprint,
        latest_checkpoint,
        load_checkpoint,
        refuse_to_overwrite,
        save_checkpoint,
        truncate_jsonl,
        write_step_eval,
    )
    from preflab.train.launch import make_accelerator

    run_dir = Path(run_dir)
    refuse_to_overwrite(run_dir, resume=resume)
    acc = make_accelerator(cfg, "DPOConfig")
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise ValueError(f"DPOConfig.batch_size: {cfg.batch_size} is not divisible by {world} processes")
    seed_everything(cfg.seed)
    fuse_gelu(policy, ref)  # the same activation in one kernel (models.hf.fuse_gelu)
    warn_low_precision(policy, "train_dpo")
    resuming = resume and latest_checkpoint(run_dir) is not None
    if resuming:
        check_resume(cfg, run_dir, may_change=("checkpoint_every", "keep_last", "eval_batch_size", "progress"))
    data_fp = fingerprint(train)
    check_inputs(run_dir, {"train_data": data_fp, "val_data": fingerprint(val or []), **(inputs or {})},
                 resuming=resuming, write=acc.is_main_process)
    if acc.is_main_process:
        write_config(cfg, run_dir)
    pad_id = tokenizer.pad_token_id

    # ---- data: encode once, skip ties, reference log-probs once ---------------------------
    usable = [ex for ex in train if not ex.is_tie]
    ties = len(train) - len(usable)
    if not usable:
        raise ValueError("train_dpo: no non-tie pairs to train on")
    max_length = fit_length(policy, cfg.max_length)
    encoded = [encode_example(tokenizer, ex, max_length=max_length, prompt_format=cfg.prompt_format)
               for ex in usable]
    ref = ref.to(acc.device).eval().requires_grad_(False)
    ref_path = run_dir / "ref_logprobs.pt"
    cached = torch.load(ref_path, weights_only=True) if resume and ref_path.exists() else None
    if cached is not None and cached.get("data") == data_fp and cached["chosen"].shape[0] == len(encoded):
        ref_c, ref_r = cached["chosen"], cached["rejected"]
    else:
        with acc.autocast():
            ref_c, ref_r = _all_logprobs(ref, encoded, pad_id, cfg.eval_batch_size, acc.device)
        if acc.is_main_process:
            torch.save({"chosen": ref_c, "rejected": ref_r, "data": data_fp}, ref_path)
    val_enc = [encode_example(tokenizer, ex, max_length=max_length, prompt_format=cfg.prompt_format)
               for ex in (val or []) if not ex.is_tie]
    val_ref = None
    if val_enc:
        with acc.autocast():
            val_ref = _all_logprobs(ref, val_enc, pad_id, cfg.eval_batch_size, acc.device)

    # ---- model, optimiser, schedule ---------------------------------------------------------
    policy.eval()  # no dropout: the log-probs are compared with the reference's
    scorer = PairLogprobs(policy).to(acc.device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    decay = (lambda i: max(0.0, 1.0 - i / total)) if cfg.lr_schedule == "linear" else (lambda i: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    scorer, optimizer = acc.prepare(scorer, optimizer)

    metrics_path = run_dir / "metrics.jsonl"
    start, history, last_ckpt = 0, [], None
    if resume and (last_ckpt := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(last_ckpt, modules={"policy": acc.unwrap_model(scorer).model},
                                optimizers={"optimizer": optimizer}, schedulers={"scheduler": scheduler})
        start = state["step"]
        history = truncate_jsonl(metrics_path, start) if acc.is_main_process else []
    elif acc.is_main_process:
        metrics_path.unlink(missing_ok=True)

    def validate() -> dict[str, float]:
        if not val_enc:
            return {}
        with acc.autocast():
            pc, pr = _all_logprobs(acc.unwrap_model(scorer).model, val_enc, pad_id, cfg.eval_batch_size, acc.device)
        out = preference_loss(cfg, pc, pr, *val_ref)
        margin = out.chosen_rewards - out.rejected_rewards
        return {"val/loss": float(out.losses.mean()), "val/accuracy": float((margin > 0).float().mean()),
                "val/reward_margin": float(margin.mean())}

    progress = Progress(disable=not (cfg.progress and acc.is_main_process))
    with progress:
        task = progress.add_task("dpo", total=total, completed=start)
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, k = divmod(step, per_epoch)
            order = list(range(len(encoded)))
            random.Random(f"dpo-order:{cfg.seed}:{epoch}").shuffle(order)
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            share = math.ceil(len(idx) / world)
            mine = idx[rank * share : (rank + 1) * share] or idx[-1:]  # a short last batch: reuse a pair
            batch: PairBatch = collate_pairs([encoded[i] for i in mine], pad_id=pad_id).to(acc.device)

            with acc.autocast():
                pc, pr = scorer(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
            rc, rr = ref_c[mine].to(acc.device), ref_r[mine].to(acc.device)
            out = preference_loss(cfg, pc, pr, rc, rr)
            n_chosen = batch.response_mask[0::2].sum(-1).clamp_min(1)  # (B,)
            rpo = -(pc / n_chosen)  # RPO: + alpha * NLL of the chosen response per token (Pang et al. 2024)
            if world == 1:
                loss = out.losses.mean() + (cfg.rpo_alpha * rpo.mean() if cfg.rpo_alpha > 0 else 0.0)
            else:  # the mean over the step's pairs, whatever each process's share: DDP averages over processes
                per_pair = out.losses + (cfg.rpo_alpha * rpo if cfg.rpo_alpha > 0 else 0.0)
                own = len(idx[rank * share : (rank + 1) * share])  # 0: the reused pair counts nothing
                loss = per_pair.sum() * (1.0 if own else 0.0) * world / len(idx)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()

            def mean_all(x: torch.Tensor) -> float:
                return float(acc.reduce(x.detach().float().mean().to(acc.device), "mean"))

            margin = out.chosen_rewards - out.rejected_rewards
            row = {"step": step + 1, "epoch": epoch, "dpo/loss": mean_all(out.losses), "train/loss": mean_all(loss),
                   "dpo/reward_margin": mean_all(margin), "dpo/accuracy": mean_all((margin > 0).float()),
                   "dpo/chosen_reward": mean_all(out.chosen_rewards),
                   "dpo/rejected_reward": mean_all(out.rejected_rewards),
                   "train/lr": scheduler.get_last_lr()[0], "time/step_s": time.perf_counter() - t0}
            if step == 0:
                row["data/ties_skipped"] = ties
            save_now = (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total
            if save_now:
                row.update(validate())
            history.append(row)
            if acc.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")

            # ---- checkpoint (after the metrics row, so a resume never loses it) ----------------
            if save_now:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    if eval_hook is not None:  # before the checkpoint, so a stop between them cannot lose it
                        model = acc.unwrap_model(scorer).model
                        was_training = model.training
                        write_step_eval(run_dir, step + 1, eval_hook(step + 1, model.eval()))
                        model.train(was_training)
                    last_ckpt = save_checkpoint(run_dir, step + 1, modules={"policy": acc.unwrap_model(scorer).model},
                                                optimizers={"optimizer": optimizer},
                                                schedulers={"scheduler": scheduler},
                                                keep_last=cfg.keep_last or None)
            progress.update(task, advance=1, description=f"dpo loss {row['dpo/loss']:.3f} acc {row['dpo/accuracy']:.2f}")

    policy_dir = None
    if acc.is_main_process:
        policy_dir = run_dir / "policy"
        acc.unwrap_model(scorer).model.save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
    acc.wait_for_everyone()
    return RunResult(run_dir, total, history, [], last_ckpt, policy_dir, resumed_from=start)
