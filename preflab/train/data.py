"""Preference data for reward-model and DPO training: examples, prompt-level split, tokenised pair batches.

A dialogue is ``format_prompt(prompt)`` followed by ``" " + response + eos`` (the shared
contract; ``prompt_format="raw"`` concatenates as TRL does). Prompt and response are
tokenised separately, so the same token ids feed the plain forward and the one that
computes the prompt once and shares it between chosen and rejected.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preflab.sandbox.domain import format_prompt


@dataclass(frozen=True)
class PreferenceExample:
    """One judged pair. ``strength`` is the rater's stated strength (0..3, None unknown);
    ``margin`` (if set) overrides the strength map for this pair (TRL's ``margin`` column)."""

    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    strength: int | None = None
    rater: str | None = None
    topic: str | None = None
    is_tie: bool = False
    margin: float | None = None
    chosen_id: str | None = None
    rejected_id: str | None = None


_FIELDS = {f.name for f in dataclasses.fields(PreferenceExample)}
# the store's ``ops.PreferenceExample`` names -> ours
_ALIASES = {"prompt_text": "prompt", "chosen_text": "chosen", "rejected_text": "rejected"}


def example_from_row(row: Mapping[str, Any] | Any, *, where: str = "row") -> PreferenceExample:
    """A ``PreferenceExample`` from a mapping or an object with the same attribute names
    (e.g. a row of the store's ``ops.preference_examples``); extra fields are ignored."""
    if not isinstance(row, Mapping):
        row = {k: getattr(row, k) for k in (*_FIELDS, *_ALIASES) if hasattr(row, k)}
    row = {_ALIASES.get(k, k): v for k, v in row.items()}
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        raise ValueError(f"{where}: TRL's conversational format (lists of messages) is not read here: give "
                         "'prompt', 'chosen' and 'rejected' as strings (the user's turn, and each answer)")
    if row.get("prompt") is None and isinstance(row.get("chosen"), str):
        raise ValueError(f"{where}: no 'prompt' (TRL's implicit-prompt format, the prompt inside chosen and "
                         "rejected, is not read here): give the prompt apart, and chosen / rejected as the answers")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {type(row.get(key)).__name__}")
    strength = row.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, int) or not 0 <= strength <= 3):
        raise ValueError(f"{where}: field 'strength' must be 0-3 (negligible, slightly, clearly, much better) or "
                         f"null, got {strength!r}")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"{where}: field 'margin' must be a number or null, got {margin!r}")
    return PreferenceExample(
        pair_id=str(row.get("pair_id") if row.get("pair_id") is not None else where),
        prompt=row["prompt"], chosen=row["chosen"], rejected=row["rejected"], strength=strength,
        rater=None if row.get("rater") is None else str(row["rater"]),
        topic=row.get("topic"), is_tie=bool(row.get("is_tie", False)),
        margin=None if margin is None else float(margin),
        chosen_id=None if row.get("chosen_id") is None else str(row["chosen_id"]),
        rejected_id=None if row.get("rejected_id") is None else str(row["rejected_id"]),
    )


def examples_from_rows(rows: Iterable[Mapping[str, Any] | Any]) -> list[PreferenceExample]:
    return [example_from_row(r, where=f"row {i}") for i, r in enumerate(rows)]


def load_jsonl(path: str | Path) -> list[PreferenceExample]:
    """Read TRL-style preference JSONL (``prompt``/``chosen``/``rejected``[/``margin``], plus any
    ``PreferenceExample`` field); errors name ``file:line``."""
    path = Path(path)
    out = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            row.setdefault("pair_id", f"{path.name}:{n}")
            out.append(example_from_row(row, where=where))
    if not out:
        raise ValueError(f"{path}: no preference rows")
    return out


def split_by_prompt(
    examples: Sequence[PreferenceExample], *, val_fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Seeded train/validation split by *prompt*: every prompt lands on exactly one side."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    prompts = sorted({e.prompt for e in examples})
    random.Random(f"split:{seed}").shuffle(prompts)
    n_val = round(len(prompts) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(prompts) > 1:
        n_val = 1
    val_prompts = set(prompts[:n_val])
    train = [e for e in examples if e.prompt not in val_prompts]
    val = [e for e in examples if e.prompt in val_prompts]
    return train, val


# ---- tokenisation ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS unless truncated
    rejected_ids: list[int]
    strength: int | None
    margin: float | None
    is_tie: bool
    truncated: bool


PROMPT_FORMATS = ("dialogue", "raw", "chat")


def dialogue_prompt(prompt: str, prompt_format: str = "dialogue", tokenizer=None) -> str:  # noqa: ANN001
    """The text before the response: ``format_prompt(prompt)`` ("dialogue"), the raw prompt ("raw",
    TRL's concatenation) or the prompt as a user turn in ``tokenizer``'s chat template ("chat")."""
    if prompt_format == "dialogue":
        return format_prompt(prompt)
    if prompt_format == "raw":
        return prompt
    if prompt_format == "chat":
        from preflab.models.hf import chat_prompt

        if tokenizer is None:
            raise ValueError("prompt_format 'chat': needs the tokenizer")
        return chat_prompt(tokenizer, prompt)
    raise ValueError(f"prompt_format: must be 'dialogue', 'raw' or 'chat', got {prompt_format!r}")


def encode_prompt_response(
    tokenizer, prompt: str, responses: Sequence[str], *, max_length: int, prompt_format: str = "dialogue"
) -> tuple[list[int], list[list[int]], bool]:
    """Token ids of the prompt and of each ``" " + response + eos`` (no leading space for "raw" and
    "chat": a chat template's generation prompt ends where the answer starts). In "chat" a response
    ends with the template's end-of-turn token where it has one (``models.sampling.end_of_turn``:
    ``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``), as the model ends its own answers and the
    sampler stops, instead of the EOS.

    The prompt starts with the tokenizer's default BOS, once (``models.sampling.default_bos``:
    Llama-style tokenizers have one, GPT-2 style none), as the sampler's prompts do. It keeps its
    last tokens and each response its first so that prompt + response fits ``max_length``; the
    prompt may use at most half of it when it would not fit.
    Returns (prompt_ids, response_ids, truncated).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos token")
    from preflab.models.sampling import default_bos, end_of_turn

    if prompt_format == "chat":
        eos = end_of_turn(tokenizer) or eos
    bos = default_bos(tokenizer)  # Llama-style tokenizers start every text with it; GPT-2 style: None
    p_ids = tokenizer(dialogue_prompt(prompt, prompt_format, tokenizer), add_special_tokens=False)["input_ids"]
    if bos is not None and p_ids[:1] == [bos]:  # a chat template wrote it: placed once, below
        p_ids = p_ids[1:]
    sep = " " if prompt_format == "dialogue" else ""
    r_ids = [tokenizer(sep + r, add_special_tokens=False)["input_ids"] + [eos] for r in responses]
    truncated = False
    longest = max(len(r) for r in r_ids)
    budget = max_length - (bos is not None)
    if len(p_ids) + longest > budget:
        truncated = True
        keep_p = min(len(p_ids), max(budget // 2, budget - longest))
        p_ids = p_ids[len(p_ids) - keep_p:]
        r_ids = [r[: budget - len(p_ids)] for r in r_ids]
    if not p_ids:
        raise ValueError("prompt: encodes to zero tokens")
    return ([bos] if bos is not None else []) + p_ids, r_ids, truncated


def encode_example(tokenizer, ex: PreferenceExample, *, max_length: int,
                   prompt_format: str = "dialogue") -> EncodedPair:
    p, (c, r), trunc = encode_prompt_response(tokenizer, ex.prompt, [ex.chosen, ex.rejected],
                                              max_length=max_length, prompt_format=prompt_format)
    return EncodedPair(p, c, r, ex.strength, ex.margin, ex.is_tie, trunc)


@dataclass
class PairBatch:
    """A padded batch of B pairs. Responses are interleaved: row 2i is chosen_i, 2i+1 rejected_i."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (2B, R) right-padded
    response_mask: torch.Tensor  # (2B, R)
    strength: list[int | None]
    margin: list[float | None]
    is_tie: torch.Tensor  # (B,) bool

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device) -> PairBatch:
        return dataclasses.replace(self, prompt_ids=self.prompt_ids.to(device), prompt_mask=self.prompt_mask.to(device),
                                   response_ids=self.response_ids.to(device),
                                   response_mask=self.response_mask.to(device), is_tie=self.is_tie.to(device))

    def slice(self, start: int, stop: int) -> PairBatch:
        """Pairs ``start:stop`` (for gradient accumulation), re-trimmed to their own padding."""
        pm = self.prompt_mask[start:stop]
        rm = self.response_mask[2 * start: 2 * stop]
        p_keep = int(pm.sum(-1).max())
        r_keep = int(rm.sum(-1).max())
        P = pm.shape[1]
        return PairBatch(self.prompt_ids[start:stop, P - p_keep:], pm[:, P - p_keep:],
                         self.response_ids[2 * start: 2 * stop, :r_keep], rm[:, :r_keep],
                         self.strength[start:stop], self.margin[start:stop], self.is_tie[start:stop])


def collate_pairs(items: Sequence[EncodedPair], *, pad_id: int) -> PairBatch:
    """Pad prompts on the left and responses on the right (prompt ends line up at column P)."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    B = len(items)
    P = max(len(x.prompt_ids) for x in items)
    R = max(max(len(x.chosen_ids), len(x.rejected_ids)) for x in items)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.long)
    resp_ids = torch.full((2 * B, R), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((2 * B, R), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.prompt_ids)
        prompt_ids[i, P - n:] = torch.tensor(x.prompt_ids)
        prompt_mask[i, P - n:] = 1
        for j, r in enumerate((x.chosen_ids, x.rejected_ids)):
            resp_ids[2 * i + j, : len(r)] = torch.tensor(r)
            resp_mask[2 * i + j, : len(r)] = 1
    return PairBatch(prompt_ids, prompt_mask, resp_ids, resp_mask, [x.strength for x in items],
                     [x.margin for x in items], torch.tensor([x.is_tie for x in items], dtype=torch.bool))


TRAINING_ROUNDS = ("calibration", "collection", "rerate")


def load_store_examples(db_url: str, *, project: str,
                        round_kinds: Sequence[str] = TRAINING_ROUNDS) -> list[PreferenceExample]:
    """The training pairs of ``project`` from the store: the latest judgement per (pair, rater)
    under the newest guideline version, planted duplicates once (``ops.preference_examples``),
    from rounds of ``round_kinds`` (calibration-workshop rounds too by default; the demo trains
    on collection and re-rate rounds only)."""
    from preflab.store import db, ops
    from preflab.store.schema import ROUND_KINDS

    bad = [k for k in round_kinds if k not in ROUND_KINDS]
    if bad or not round_kinds:
        raise ValueError(f"--rounds: {', '.join(bad) or 'nothing'} given; round kinds are {', '.join(ROUND_KINDS)}")
    engine = db.make_engine(db_url, create=False)
    with db.session_scope(engine, readonly=True) as s:
        pid = ops.require_project(s, name=project, where=db_url)
        rows = ops.preference_examples(s, project_id=pid, round_kinds=tuple(round_kinds))
    if not rows:
        raise ValueError(f"{db_url}: project {project!r} has no judged pairs in {', '.join(round_kinds)} rounds yet")
    return examples_from_rows(rows)
