"""Comparison pairs from policy samples.

For each prompt: drop empty and oversize candidates, merge identical texts (after
trimming and collapsing whitespace; the merged response keeps every source in
``meta["sources"]``), then choose up to ``pairs_per_prompt`` distinct pairs:

- ``strategy="random"``: a seeded sample of all unordered pairs;
- ``strategy="cross_source"``: pairs whose responses come from different sources first
  (e.g. the new checkpoint against the old one), then the rest, each group seeded-shuffled.

Which response is canonical ``a`` is a seeded coin flip, so ``a`` is not always the
newer model. Ids are content hashes (``<prefix>r_<12 hex>``, ``<prefix>p_<12 hex>``),
so rebuilding from the same samples yields the same ids and a re-import is a no-op.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.orm import Session

from preflab.config import check, field_doc
from preflab.store import ops
from preflab.store.io import ImportResult
from preflab.store.ops import PairIn, PromptIn, ResponseIn


@dataclass
class PairsConfig:
    pairs_per_prompt: int = field_doc(1, "Comparison pairs to build per prompt (fewer if too few distinct responses).")
    strategy: Literal["random", "cross_source"] = field_doc(
        "cross_source", "'cross_source': pairs across different sources first; 'random': any two responses.")
    max_chars: int = field_doc(4000, "Candidates longer than this (characters) are dropped.")
    id_prefix: str = field_doc("", "Prefix of generated response and pair ids (keeps projects apart).")
    seed: int = field_doc(0, "Seed of pair choice and of which response is canonical 'a'.")

    def validate(self) -> None:
        check(self.pairs_per_prompt >= 1, "pairs.pairs_per_prompt", f"must be >= 1, got {self.pairs_per_prompt}")
        check(self.strategy in ("random", "cross_source"), "pairs.strategy",
              f"must be 'random' or 'cross_source', got {self.strategy!r}")
        check(self.max_chars >= 1, "pairs.max_chars", f"must be >= 1, got {self.max_chars}")
        check(self.seed >= 0, "pairs.seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Candidate:
    """One sampled response to a prompt; ``source`` names the model / checkpoint."""

    prompt_id: str
    text: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairPlan:
    """What ``build_pairs`` would add to the store, plus what it dropped and why."""

    prompts: list[PromptIn]
    responses: list[ResponseIn]
    pairs: list[PairIn]
    dropped: dict[str, int]  # reason -> count: empty, too_long, duplicate, unknown_prompt, single


def normalise(text: str) -> str:
    """The text used to decide that two candidates are identical (trimmed, whitespace collapsed)."""
    return re.sub(r"\s+", " ", text).strip()


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:12]


def _shuffled(items: list, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items


def build_pairs(prompts: Sequence[PromptIn], candidates: Sequence[Candidate], cfg: PairsConfig) -> PairPlan:
    """Deduplicate each prompt's candidates and choose its comparison pairs (module docstring)."""
    cfg.validate()
    by_id = {p.id: p for p in prompts}
    dropped = {"empty": 0, "too_long": 0, "duplicate": 0, "unknown_prompt": 0, "single": 0}
    groups: dict[str, dict[str, dict[str, Any]]] = {}  # prompt id -> normalised text -> merged response
    for c in candidates:
        if c.prompt_id not in by_id:
            dropped["unknown_prompt"] += 1
            continue
        norm = normalise(c.text)
        if not norm:
            dropped["empty"] += 1
            continue
        if len(c.text) > cfg.max_chars:
            dropped["too_long"] += 1
            continue
        group = groups.setdefault(c.prompt_id, {})
        if norm in group:
            dropped["duplicate"] += 1
            if c.source not in group[norm]["sources"]:
                group[norm]["sources"].append(c.source)
            continue
        group[norm] = {"text": c.text.strip(), "source": c.source, "sources": [c.source], "meta": dict(c.meta)}
    out_prompts, responses, pairs = [], [], []
    for pid in sorted(groups):
        group = groups[pid]
        if len(group) < 2:
            dropped["single"] += 1
            continue
        rng = random.Random(f"pairs:{cfg.seed}:{pid}")
        resps = []
        for norm, r in group.items():
            rid = f"{cfg.id_prefix}r_{_hash(pid, norm)}"
            meta = {**r["meta"], "sources": r["sources"]}
            resps.append(ResponseIn(id=rid, prompt_id=pid, text=r["text"], source=r["source"], meta=meta))
        combos = list(itertools.combinations(range(len(resps)), 2))
        if cfg.strategy == "cross_source":
            cross = [c for c in combos if not set(resps[c[0]].meta["sources"]) & set(resps[c[1]].meta["sources"])]
            same = [c for c in combos if c not in set(cross)]
            order = _shuffled(cross, rng) + _shuffled(same, rng)
        else:
            order = _shuffled(combos, rng)
        used = set()
        for i, j in order[: cfg.pairs_per_prompt]:
            a, b = (resps[i], resps[j]) if rng.random() < 0.5 else (resps[j], resps[i])
            pair_id = f"{cfg.id_prefix}p_{_hash(pid, *sorted((a.id, b.id)))}"
            pairs.append(PairIn(id=pair_id, prompt_id=pid, response_a_id=a.id, response_b_id=b.id,
                                meta={"strategy": cfg.strategy}))
            used.update((a.id, b.id))
        out_prompts.append(by_id[pid])
        responses.extend(r for r in resps if r.id in used)
    return PairPlan(out_prompts, responses, pairs, dropped)


def add_plan(session: Session, *, project_id: int, plan: PairPlan) -> ImportResult:
    """Store a ``PairPlan`` (prompts, responses, pairs) in the caller's transaction."""
    return ImportResult(
        prompts=ops.add_prompts(session, project_id=project_id, prompts=plan.prompts),
        responses=ops.add_responses(session, project_id=project_id, responses=plan.responses),
        pairs=ops.add_pairs(session, project_id=project_id, pairs=plan.pairs),
    )


def sample_candidates(
    policies: Mapping[str, tuple[Any, Any]],
    prompts: Sequence[PromptIn],
    *,
    n_per_policy: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    prompt_format: Callable[[str], str] | Mapping[str, Callable[[str], str]] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Candidate]:
    """Sample ``n_per_policy`` responses per prompt from each ``label -> (model, tokenizer)``.

    ``prompt_format`` turns a stored prompt text into the model's input (e.g. the sandbox's
    ``format_prompt``), or maps each label to its own (e.g. each model's chat template); the
    identity by default. The candidate's source is the label.
    ``on_batch(n)`` is called after each batch with the number of responses it sampled
    (a progress bar's advance).
    """
    import torch

    from preflab.models.sampling import sample

    if n_per_policy < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("sample_candidates: n_per_policy, max_new_tokens and batch_size must be >= 1")
    out: list[Candidate] = []
    for k, (label, (model, tok)) in enumerate(sorted(policies.items())):
        fmt = (prompt_format[label] if isinstance(prompt_format, Mapping) else prompt_format) or (lambda t: t)
        gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed * 1000 + k)
        rows = [p for p in prompts for _ in range(n_per_policy)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            with torch.no_grad():
                s = sample(model, tok, [fmt(p.text) for p in chunk], max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, generator=gen)
            out.extend(Candidate(prompt_id=p.id, text=t, source=label) for p, t in zip(chunk, s.texts, strict=True))
            if on_batch is not None:
                on_batch(len(chunk))
    return out
