"""Batched sampling with a KV cache, and per-token log-probs of given tokens.

Our own decode loop over the model's cache (not ``model.generate``), so that what RLHF
needs comes out of one pass: left-padded prompts with correct position ids, temperature,
top-p, min/max new tokens, per-row stop at EOS or end-of-turn, and the log-prob of every sampled token
under the model's raw (temperature 1) distribution, which is what PPO's ratio uses.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    """A batch of sampled responses (all tensors on the model's device)."""

    input_ids: torch.Tensor  # (B, T) left-padded prompt + response, T = prompt_len + R
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt tokens and on the response up to EOS
    prompt_len: int  # padded prompt width P
    response_ids: torch.Tensor  # (B, R) pad after EOS
    response_mask: torch.Tensor  # (B, R) 1 up to and including the stop token
    logprobs: torch.Tensor  # (B, R) log p(token) under the raw model distribution; 0 where masked
    texts: list[str]  # decoded responses, the stop token stripped
    ended: torch.Tensor  # (B,) bool: the response ended with a stop token (not cut at max_new_tokens)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: left padding does not shift a prompt. (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def max_positions(model) -> int | None:
    """The model's context length (``n_positions`` / ``max_position_embeddings``), if it has one."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def fit_length(model, max_length: int) -> int:
    """``max_length`` cut to the model's context length: a longer sequence would index past its
    position table (an IndexError deep in the model); texts are truncated to fit instead."""
    n = max_positions(model)
    return min(max_length, int(n)) if n else max_length


def _cache_kw(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def logits_to_keep_kw(model: torch.nn.Module, keep: int) -> dict:
    """``logits_to_keep=keep`` where the model supports it (skips the LM head on the prompt)."""
    return {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def sample_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """One token per row from ``logits`` (B, V) -> (B,).

    Temperature 0 is greedy. Sampling uses the exponential-race form of the categorical
    (argmax of p_i / E_i with E_i ~ Exp(1) is distributed as Categorical(p)), which draws a
    fixed number of random numbers per call, so batches stay reproducible for a seed.
    Top-p (Holtzman et al. 2020) keeps the smallest set of tokens whose mass reaches p.
    ``generator`` may be one per row: then a row's draws depend only on its own generator, not
    on the batch it shares (a rollout split over processes samples what one process would).
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p  # mass before this token already reaches p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    if isinstance(generator, Sequence):
        if len(generator) != len(probs):
            raise ValueError(f"generator: {len(generator)} per-row generators for {len(probs)} rows")
        race = torch.stack([torch.empty(probs.shape[1], device=g.device).exponential_(1.0, generator=g)
                            for g in generator]).to(probs.device)
    else:
        dev = generator.device if generator is not None else probs.device
        race = torch.empty(probs.shape, device=dev).exponential_(1.0, generator=generator).to(probs.device)
    return (probs / race).argmax(-1)


_PER_TOKENIZER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {what: (key, value)}


def _once_per_tokenizer(tokenizer, what: str, key, find):
    """``find()``, remembered for ``tokenizer`` while ``key`` (what it depends on) is unchanged:
    encoding every training pair asks."""
    try:
        known = _PER_TOKENIZER.setdefault(tokenizer, {})
    except TypeError:  # neither hashable nor weakly referable: find it each time
        return find()
    if what not in known or known[what][0] != key:
        known[what] = (key, find())
    return known[what][1]


def default_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts first when asked to add special tokens (Llama, Mistral, Gemma and
    OPT tokenizers do, and their models expect it), else None (GPT-2 style tokenizers add none)."""
    bos = getattr(tokenizer, "bos_token_id", None)

    def find():
        with_special = tokenizer("a")["input_ids"] if bos is not None else []
        return bos if with_special and with_special[0] == bos else None

    return _once_per_tokenizer(tokenizer, "bos", bos, find)


_MARK = "preflab-answer-mark"  # an answer no template rewrites


def end_of_turn(tokenizer) -> int | None:
    """The special token the tokenizer's chat template writes right after an assistant answer
    (``<|im_end|>`` Qwen/ChatML, ``<end_of_turn>`` Gemma, ``<|eot_id|>`` Llama 3, ``<|end|>`` Phi-3),
    or None: no chat template, a template that ends the answer with ordinary text, or the EOS itself
    (Mistral, Zephyr). Instruct models end their answers with it, not with the EOS."""
    template = getattr(tokenizer, "chat_template", None)

    def find():
        if not template:
            return None
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that needs other roles or arguments: no end found
            return None
        at = text.rfind(_MARK) if isinstance(text, str) else -1
        rest = text[at + len(_MARK):] if at >= 0 else ""
        ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        if not ids:
            return None
        first = ids[0]
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        return first if first in special and first != tokenizer.eos_token_id else None

    return _once_per_tokenizer(tokenizer, "end_of_turn", template, find)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a response, sorted: the tokenizer's EOS, the ids the model's
    ``generation_config`` stops at (instruct models list their end-of-turn there, as ``generate``
    uses it), and the chat template's ``end_of_turn``."""
    ids = {tokenizer.eos_token_id, end_of_turn(tokenizer)}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    ids.discard(None)
    return sorted(int(i) for i in ids)


def encode_prompt(tokenizer, text: str, *, bos: int | None) -> list[int]:
    """A prompt's token ids, starting with ``bos`` (``default_bos(tokenizer)``; None: none) exactly
    once: special tokens are otherwise never added, and a chat template that writes the BOS into its
    text keeps its own."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _encode_prompts(tokenizer, prompts: list[str], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bos = default_bos(tokenizer)
    ids = [encode_prompt(tokenizer, p, bos=bos) if p else [] for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompts[{i}]: empty prompt")
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return input_ids.to(device), mask.to(device)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    min_new_tokens: int = 0,
    stop_at_eos: bool = True,
) -> Samples:
    """Sample a response for every prompt, batched, with the model's KV cache.

    A row stops after its first stop token (``stop_at_eos``; ``stop_token_ids``: the EOS, and an instruct
    model's end-of-turn); later positions hold pad with mask 0. With ``stop_at_eos=False`` every row
    gets exactly ``max_new_tokens`` tokens (benchmarks). ``min_new_tokens`` forbids the stop tokens
    among the first that many tokens (as in HF). ``generator``: one for
    the batch, or one per prompt (see ``sample_token``). Runs in eval mode and restores the model's
    previous mode.
    """
    if not prompts:
        raise ValueError("prompts: empty list")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos_id is None or pad_id is None:
        raise ValueError("tokenizer: needs an eos and a pad token (load it with models.hf.load_policy)")
    device = next(model.parameters()).device
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    was_training = model.training
    model.eval()
    try:
        prompt_ids, prompt_mask = _encode_prompts(tokenizer, prompts, pad_id, device)
        B, P = prompt_ids.shape
        limit = max_positions(model)
        longest = int(prompt_mask.sum(-1).max())
        if limit is not None and longest + max_new_tokens > limit:
            raise ValueError(f"max_new_tokens: a prompt of {longest} tokens + {max_new_tokens} new tokens "
                             f"exceeds the model's {limit} positions")
        cache_kw = _cache_kw(model)
        pos = position_ids_from_mask(prompt_mask)  # (B, P)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos,
                    use_cache=True, **logits_to_keep_kw(model, 1))
        cache, logits = _cache_of(out), out.logits[:, -1, :]  # (B, V)
        next_pos = pos[:, -1:] + 1  # (B, 1)
        mask = torch.ones((B, P + max_new_tokens), dtype=torch.long, device=device)
        mask[:, :P] = prompt_mask  # the full-width mask; step t reads its first P + t + 1 columns
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        n = 0
        for t in range(max_new_tokens):
            if t < min_new_tokens:
                logits = logits.clone()
                logits[:, stops] = float("-inf")
            tok = sample_token(logits, temperature=temperature, top_p=top_p, generator=generator)  # (B,)
            lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            if stop_at_eos:
                tok = torch.where(alive, tok, pad_id)
                lp = torch.where(alive, lp, 0.0)
            tokens[:, t] = tok
            logps[:, t] = lp
            n = t + 1
            if stop_at_eos:
                alive &= ~torch.isin(tok, stops)
                if not bool(alive.any()):
                    break
            if t + 1 == max_new_tokens:
                break
            out = model(input_ids=tok[:, None], attention_mask=mask[:, : P + t + 1], position_ids=next_pos,
                        use_cache=True, **{cache_kw: cache})
            cache, logits = _cache_of(out), out.logits[:, -1, :]
            next_pos = next_pos + 1
        tokens, logps = tokens[:, :n], logps[:, :n]
        is_stop = torch.isin(tokens, stops).long()
        if stop_at_eos:  # 1 up to and including the first stop token, 0 after it
            response_mask = ((is_stop.cumsum(-1) - is_stop) == 0).long()
        else:
            response_mask = torch.ones_like(tokens)
        texts = []
        for row, stop in zip(tokens.tolist(), is_stop.tolist(), strict=True):
            if 1 in stop:
                row = row[: stop.index(1)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
        return Samples(
            input_ids=torch.cat([prompt_ids, tokens], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
            prompt_len=P,
            response_ids=tokens,
            response_mask=response_mask,
            logprobs=logps * response_mask,
            texts=texts,
            ended=is_stop.bool().any(-1),
        )
    finally:
        model.train(was_training)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for t >= ``start``: (B, T - start).

    Differentiable (call under ``torch.no_grad()`` for a frozen reference). Positions come
    from ``attention_mask``, so left padding is handled; masked positions still get a value
    and the caller masks them. Logits are only computed from position ``start - 1`` on.
    ``log p = logit_y / temp - logsumexp(logits / temp)``.
    """
    logits = _continuation_logits(model, input_ids, attention_mask, start, temperature)
    targets = input_ids[:, start:]  # (B, T - start)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_log_softmax(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The whole next-token distribution, log p(. | input_ids[:, :t]) for t >= ``start``:
    (B, T - start, V) float32. ``sequence_logprobs`` is this gathered at the tokens; this one is for an
    exact per-state KL (``losses.kl.kl_full``) and costs B x (T - start) x V floats of memory."""
    logits = _continuation_logits(model, input_ids, attention_mask, start, temperature)
    return torch.log_softmax(logits, dim=-1)


def _continuation_logits(model, input_ids, attention_mask, start: int, temperature: float) -> torch.Tensor:
    """Float logits predicting tokens ``start .. T-1`` (B, T - start, V), divided by ``temperature``."""
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if not 1 <= start < T:
        raise ValueError(f"start: must be in [1, {T - 1}], got {start}")
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                **logits_to_keep_kw(model, T - start + 1))
    logits = out.logits[:, -(T - start + 1):-1, :].float()  # (B, T - start, V): predicts tokens start .. T-1
    return logits / temperature if temperature != 1.0 else logits
