"""Rounds: creation over pairs (seeded order, item domains), listing, status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from preflab.store.ops.base import (
    StoreError,
    _meta,
    _project,
    _round,
    _text,
    _unit,
)
from preflab.store.ops.people import (
    latest_guideline,
)
from preflab.store.ops.records import (
    RoundInfo,
)
from preflab.store.schema import (
    FALLBACKS,
    ROUND_KINDS,
    ROUND_STATUSES,
    ROUTINGS,
    GuidelineVersion,
    Pair,
    Prompt,
    Round,
    RoundItem,
)

# ---- rounds -----------------------------------------------------------------------------


def create_round(
    session: Session,
    *,
    project_id: int,
    name: str,
    kind: str,
    pair_ids: Sequence[str],
    guideline_version_id: int | None = None,
    overlap: int = 1,
    duplicate_rate: float = 0.1,
    duplicate_gap: int = 5,
    allow_ties: bool = True,
    min_rationale_chars: int = 10,
    routing: str = "specialty",
    fallback: str = "always",
    fallback_after_s: float = 0.0,
    lease_s: float = 900.0,
    seed: int = 0,
    status: str = "open",
    meta: Mapping[str, Any] | None = None,
) -> int:
    """Create a round over ``pair_ids`` (each item's domain = its prompt's topic).

    ``guideline_version_id`` defaults to the project's newest version. Items are served
    in an order shuffled by ``seed``. See the module docstring for routing and duplicates.
    """
    _project(session, project_id)
    name = _text(name, "round.name", max_len=200)
    if kind not in ROUND_KINDS:
        raise StoreError(f"round.kind: must be one of {list(ROUND_KINDS)}, got {kind!r}")
    if status not in ROUND_STATUSES:
        raise StoreError(f"round.status: must be one of {list(ROUND_STATUSES)}, got {status!r}")
    if routing not in ROUTINGS:
        raise StoreError(f"round.routing: must be one of {list(ROUTINGS)}, got {routing!r}")
    if fallback not in FALLBACKS:
        raise StoreError(f"round.fallback: must be one of {list(FALLBACKS)}, got {fallback!r}")
    for fname, v, lo in (("overlap", overlap, 1), ("duplicate_gap", duplicate_gap, 0),
                         ("min_rationale_chars", min_rationale_chars, 0), ("seed", seed, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise StoreError(f"round.{fname}: must be an integer >= {lo}, got {v!r}")
    if not isinstance(duplicate_rate, (int, float)) or not 0.0 <= duplicate_rate <= 1.0:
        raise StoreError(f"round.duplicate_rate: must be in [0, 1], got {duplicate_rate!r}")
    if not isinstance(lease_s, (int, float)) or lease_s <= 0:
        raise StoreError(f"round.lease_s: must be > 0, got {lease_s!r}")
    if not isinstance(fallback_after_s, (int, float)) or fallback_after_s < 0:
        raise StoreError(f"round.fallback_after_s: must be >= 0, got {fallback_after_s!r}")
    if round_by_name(session, project_id=project_id, name=name) is not None:
        raise StoreError(f"round.name: {name!r} already exists", code="conflict")
    if guideline_version_id is None:
        g = latest_guideline(session, project_id=project_id)
        guideline_version_id = g.id if g else None
    else:
        g = session.get(GuidelineVersion, guideline_version_id)
        if g is None or g.project_id != project_id:
            raise StoreError(f"round.guideline_version_id: unknown guideline version {guideline_version_id}",
                             code="not_found")
    ids = list(pair_ids)
    if not ids:
        raise StoreError("round.pair_ids: a round needs at least one pair")
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise StoreError(f"round.pair_ids: pair {dup!r} listed twice")
    topics: dict[str, str] = {}
    for k in range(0, len(ids), 500):
        chunk = ids[k:k + 500]
        rows = session.execute(select(Pair.id, Pair.project_id, Prompt.topic).join(Prompt, Prompt.id == Pair.prompt_id)
                               .where(Pair.id.in_(chunk)))
        for pid, proj, topic in rows:
            if proj == project_id:
                topics[pid] = topic
    for i, pid in enumerate(ids):
        if pid not in topics:
            raise StoreError(f"round.pair_ids[{i}]: unknown pair id {pid!r}", code="not_found")
    rnd = Round(project_id=project_id, name=name, kind=kind, guideline_version_id=guideline_version_id,
                overlap=overlap, duplicate_rate=float(duplicate_rate), duplicate_gap=duplicate_gap,
                allow_ties=bool(allow_ties), min_rationale_chars=min_rationale_chars, routing=routing,
                fallback=fallback, fallback_after_s=float(fallback_after_s), lease_s=float(lease_s),
                status=status, seed=seed, meta=_meta(meta, "round.meta"))
    session.add(rnd)
    session.flush()
    order = sorted(range(len(ids)), key=lambda i: _unit("order", seed, ids[i]))
    session.add_all(RoundItem(round_id=rnd.id, pair_id=ids[i], domain=topics[ids[i]], position=pos)
                    for pos, i in enumerate(order))
    session.flush()
    return rnd.id


def _round_info(session: Session, r: Round) -> RoundInfo:
    n = session.scalar(select(func.count()).select_from(RoundItem).where(RoundItem.round_id == r.id)) or 0
    label = r.guideline.label if r.guideline is not None else None
    return RoundInfo(r.id, r.project_id, r.name, r.kind, r.guideline_version_id, label, r.overlap,
                     r.duplicate_rate, r.duplicate_gap, r.allow_ties, r.min_rationale_chars, r.routing,
                     r.fallback, r.fallback_after_s, r.lease_s, r.status, r.seed, n, r.created_at,
                     dict(r.meta or {}))


def get_round(session: Session, *, round_id: int) -> RoundInfo:
    return _round_info(session, _round(session, round_id))


def round_by_name(session: Session, *, project_id: int, name: str) -> RoundInfo | None:
    """The round called ``name`` in the project (names are unique per project), or None."""
    r = session.scalar(select(Round).where(Round.project_id == project_id, Round.name == name))
    return _round_info(session, r) if r is not None else None


def list_rounds(session: Session, *, project_id: int, kind: str | None = None) -> list[RoundInfo]:
    q = select(Round).where(Round.project_id == project_id).order_by(Round.id)
    if kind is not None:
        q = q.where(Round.kind == kind)
    return [_round_info(session, r) for r in session.scalars(q)]


def set_round_status(session: Session, *, round_id: int, status: str) -> None:
    """Open or close a round (a closed round hands out no tasks and takes no judgements)."""
    if status not in ROUND_STATUSES:
        raise StoreError(f"round.status: must be one of {list(ROUND_STATUSES)}, got {status!r}")
    _round(session, round_id).status = status


def round_pair_ids(session: Session, *, round_id: int) -> list[str]:
    """The round's pair ids in serving order."""
    _round(session, round_id)
    return list(session.scalars(select(RoundItem.pair_id).where(RoundItem.round_id == round_id)
                                .order_by(RoundItem.position)))
