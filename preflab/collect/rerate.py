"""The fix loop: new guideline versions with rubric items, targeted re-rating, lineage.

When evaluation shows the raters rewarded the wrong thing (the story: confident tone on
prices nobody checked), the fix is a rubric item ("verify every price against the price
list"), a re-rate round over the affected pairs under the new guideline, and a reward model
trained on the newest guideline's judgements (``ops.preference_examples`` drops the old
labels of a re-rated pair). Lineage events record which judgements, guideline, reward model
and policy each run came from.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from preflab.store import ops
from preflab.store.ops import StoreError

WHERE_KEYS = ("topic", "round_kind", "source")


def parse_where(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["topic=pricing", "round_kind=collection"]`` -> dict; errors name the bad item."""
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise StoreError(f"--where[{i}]: expected KEY=VALUE, got {item!r}")
        if key not in WHERE_KEYS:
            raise StoreError(f"--where[{i}]: unknown key {key!r} (known: {', '.join(WHERE_KEYS)})")
        out[key] = value
    return out


def add_rubric(
    session: Session,
    *,
    project_id: int,
    label: str,
    items: list[str] | tuple[str, ...],
    text: str | None = None,
) -> int:
    """A new guideline version ``label``: the newest version's text and rubric plus ``items``."""
    if not items:
        raise StoreError("rubric.items: give at least one rubric item")
    prev = ops.latest_guideline(session, project_id=project_id)
    base_text = prev.text if prev else ""
    base_rubric = list(prev.rubric) if prev else []
    for i, it in enumerate(items):
        if not it.strip():
            raise StoreError(f"rubric.items[{i}]: empty")
        if it in base_rubric or it in items[:i]:
            where = f"guideline {prev.label}'s rubric" if it in base_rubric else "the items given"
            raise StoreError(f"rubric.items[{i}]: {it!r} is already in {where} (a new version keeps the newest "
                             "one's items; give only the new ones)")
    if text is None:
        text = base_text + "".join(f"\n- {it}" for it in items)
    return ops.create_guideline_version(session, project_id=project_id, label=label, text=text,
                                        rubric=tuple(base_rubric + list(items)))


def select_pairs(
    session: Session,
    *,
    project_id: int,
    where: Mapping[str, str],
    limit: int,
    seed: int = 0,
) -> list[str]:
    """Pair ids for re-rating: those matching ``where`` that were judged, seeded, at most ``limit``.

    Judged pairs come first (those are the labels a new rubric would change); among them the
    order is a seeded shuffle, so the selection is reproducible.
    """
    if limit < 1:
        raise StoreError(f"rerate.limit: must be >= 1, got {limit}")
    rows = ops.project_judgements(session, project_id=project_id,
                                  round_kinds=(where["round_kind"],) if "round_kind" in where else None)
    judged: dict[str, Any] = {}
    for r in rows:
        if r.is_duplicate or r.round_kind == "eval":
            continue
        if "topic" in where and r.topic != where["topic"]:
            continue
        if "source" in where and where["source"] not in (r.source_a, r.source_b):
            continue
        judged.setdefault(r.pair_id, r)
    ids = sorted(judged)
    random.Random(f"rerate:{seed}").shuffle(ids)
    return ids[:limit]


@dataclass(frozen=True)
class RerateRound:
    round_id: int
    n_pairs: int
    guideline: str


def create_rerate_round(
    session: Session,
    *,
    project_id: int,
    name: str,
    where: Mapping[str, str],
    limit: int,
    guideline: str,
    overlap: int = 1,
    seed: int = 0,
    duplicate_rate: float = 0.0,
) -> RerateRound:
    """Select pairs (``select_pairs``) and open a ``rerate`` round under guideline ``guideline``."""
    g = next((g for g in ops.list_guidelines(session, project_id=project_id) if g.label == guideline), None)
    if g is None:
        raise StoreError(f"rerate.guideline: unknown guideline version {guideline!r}", code="not_found")
    newest = ops.latest_guideline(session, project_id=project_id)
    if g.id != newest.id:
        raise StoreError(f"rerate.guideline: {guideline!r} is not the newest guideline version ({newest.label!r}); "
                         "a re-rate replaces labels under the newest one")
    pair_ids = select_pairs(session, project_id=project_id, where=where, limit=limit, seed=seed)
    if not pair_ids:
        raise StoreError(f"rerate.where: no judged pairs match {dict(where)}", code="not_found")
    rid = ops.create_round(session, project_id=project_id, name=name, kind="rerate", pair_ids=pair_ids,
                           guideline_version_id=g.id, overlap=overlap, duplicate_rate=duplicate_rate,
                           seed=seed, meta={"where": dict(where), "limit": limit})
    ops.record_event(session, kind="rerate", subject=name, project_id=project_id,
                     payload={"round_id": rid, "n_pairs": len(pair_ids), "guideline": guideline,
                              "where": dict(where)})
    return RerateRound(rid, len(pair_ids), guideline)


def record_lineage(session: Session, *, project_id: int, run: str, **payload: Any) -> None:
    """Record what a run was built from (judgement count, guideline, reward model, parent policy)."""
    ops.record_event(session, kind="lineage", subject=run, project_id=project_id, payload=payload)


def lineage(session: Session, *, project_id: int) -> list[dict[str, Any]]:
    """Every lineage record of the project, oldest first."""
    return [{"run": e.subject, "at": e.created_at.isoformat(), **e.payload}
            for e in ops.list_events(session, project_id=project_id, kind="lineage")]
