"""The sandbox's factual regression suite, built from the knowledge base (not from the gold).

Items are held-out queries (never seen in SFT or collection), spread evenly over the
facts so every topic, pricing included, is covered. For each item:

- ``required``: the fact sentence with its *current* value (so an answer about another
  fact that happens to share the value does not pass; the stilted form still matches);
- ``forbidden``: the *stale* value as a whole phrase;
- ``probe``: ``"false_premise"`` when the query asserts the stale value;
- ``group``: the fact id.

The output is plain dicts in the format of ``preflab.evaluate.factual`` (the sandbox does
not import the evaluation layer).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from preflab.sandbox.domain import KNOWLEDGE_BASE, Fact, Query, all_queries, is_heldout_text


def _phrase(value: str) -> str:
    # the value as a whole phrase: no word character directly before or after
    return r"(?<!\w)" + re.escape(value) + r"(?!\w)"


def item_for(fact: Fact, query: Query) -> dict:
    """One suite item for ``query`` about ``fact``."""
    sentence = fact.state("current")[:-1]  # without the final period (the stilted form continues)
    return {
        "id": f"{fact.id}/{query.id}",
        "topic": fact.topic,
        "query": query.text,
        "required": [re.escape(sentence)],  # matched case-insensitively
        "forbidden": [_phrase(fact.stale)],
        "probe": "false_premise" if query.false_premise else None,
        "group": fact.id,
    }


def build_suite(n: int = 150, *, seed: int = 0, false_premise_rate: float = 0.2,
                include_gaps: bool = True) -> list[dict]:
    """``n`` items from held-out queries, round-robin over the facts (seeded).

    About ``false_premise_rate`` of each fact's items are sycophancy probes. With
    ``include_gaps`` the facts the SFT corpus never states (``in_corpus=False``) are in the
    suite too: that is how ``diagnose`` finds a knowledge gap.
    """
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not 0 <= false_premise_rate <= 1:
        raise ValueError(f"false_premise_rate: must be in [0, 1], got {false_premise_rate}")
    rng = random.Random(f"factual_suite:{seed}")
    facts = [f for f in KNOWLEDGE_BASE if include_gaps or f.in_corpus]
    pools: dict[str, tuple[list[Query], list[Query]]] = {}
    for q in all_queries(include_gaps=True):
        if not is_heldout_text(q.text):
            continue
        plain, probes = pools.setdefault(q.fact_id, ([], []))
        (probes if q.false_premise else plain).append(q)
    for plain, probes in pools.values():
        rng.shuffle(plain)
        rng.shuffle(probes)
    taken: dict[str, int] = {f.id: 0 for f in facts}
    used: dict[str, list[int]] = {f.id: [0, 0] for f in facts}  # plain, probe counts
    out: list[dict] = []
    while len(out) < n:
        progress = False
        for fact in facts:
            if len(out) >= n:
                break
            plain, probes = pools.get(fact.id, ([], []))
            k = taken[fact.id]
            want_probe = probes and used[fact.id][1] < round((k + 1) * false_premise_rate)
            src, slot = (probes, 1) if want_probe else (plain, 0)
            if used[fact.id][slot] >= len(src):
                src, slot = (plain, 0) if slot else (probes, 1)
                if used[fact.id][slot] >= len(src):
                    continue
            out.append(item_for(fact, src[used[fact.id][slot]]))
            used[fact.id][slot] += 1
            taken[fact.id] += 1
            progress = True
        if not progress:
            raise ValueError(f"n: only {len(out)} distinct held-out queries exist, asked for {n}")
    return out


def write_sandbox_suite(path: str | Path, n: int = 150, *, seed: int = 0) -> Path:
    """Write the sandbox suite as JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in build_suite(n, seed=seed)))
    return path
