"""Prompts, responses and comparison pairs: bulk inserts (all or nothing) and listings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from preflab.store.ops.base import (
    StoreError,
    _ident,
    _meta,
    _project,
    _text,
)
from preflab.store.ops.records import (
    PairIn,
    PairInfo,
    PromptIn,
    ResponseIn,
)
from preflab.store.schema import (
    Pair,
    Project,
    Prompt,
    Response,
    Round,
    RoundItem,
)

# ---- prompts, responses, pairs ---------------------------------------------------------


def _as(cls: type, item: Any, where: str) -> Any:
    if isinstance(item, cls):
        return item
    if not isinstance(item, Mapping):
        raise StoreError(f"{where}: expected an object, got {type(item).__name__}")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(item) - names)
    if unknown:
        raise StoreError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(names))})")
    try:
        return cls(**item)
    except TypeError:
        missing = sorted(n for n, f in cls.__dataclass_fields__.items()
                         if n not in item and f.default is f.default_factory)  # type: ignore[misc]
        raise StoreError(f"{where}: missing field {missing[0] if missing else '?'!r}") from None


def _locs(where: str | Sequence[str], n: int) -> list[str]:
    """Per-item error locations: ``where[i]``, or the caller's own (``pairs.jsonl:812``)."""
    if isinstance(where, str):
        return [f"{where}[{i}]" for i in range(n)]
    locs = list(where)
    if len(locs) != n:
        raise StoreError(f"internal: {len(locs)} locations for {n} items")
    return locs


def _unique_by_id(items: list, locs: list[str], kind: str) -> dict[str, tuple[Any, str]]:
    seen: dict[str, tuple[Any, str]] = {}
    for it, w in zip(items, locs, strict=True):
        if it.id in seen and seen[it.id][0] != it:
            raise StoreError(f"{w}: {kind} id {it.id!r} given twice with different content "
                             f"(first at {seen[it.id][1]})")
        seen.setdefault(it.id, (it, w))
    return seen


def _elsewhere(session: Session, prompt: Prompt | None) -> str:
    """For a prompt id known only in another project: say which (ids are unique across the store)."""
    if prompt is None:
        return ""
    name = session.scalar(select(Project.name).where(Project.id == prompt.project_id))
    return f" in this project (it is in project {name!r}: a mistyped --project?)"


def add_prompts(
    session: Session, *, project_id: int, prompts: Iterable[PromptIn | Mapping[str, Any]],
    where: str | Sequence[str] = "prompts",
) -> int:
    """Insert prompts; returns how many were new. A prompt already stored with the same
    text and topic is skipped (re-import is harmless); a different one is a conflict.
    ``where`` names items in errors: a prefix (``prompts[3]``) or one location per item
    (io.py passes ``file:line``)."""
    _project(session, project_id)
    raw = list(prompts)
    locs = _locs(where, len(raw))
    items = [_as(PromptIn, p, w) for p, w in zip(raw, locs, strict=True)]
    for p, w in zip(items, locs, strict=True):
        _ident(p.id, f"{w}.id")
        _text(p.text, f"{w}.text")
        _text(p.topic, f"{w}.topic", max_len=64, allow_empty=True)
        _meta(p.meta, f"{w}.meta")
    seen = _unique_by_id(items, locs, "prompt")
    existing = _existing(session, Prompt, list(seen))
    added = 0
    for pid, (p, w) in seen.items():
        old = existing.get(pid)
        if old is not None:
            if old.project_id != project_id:
                other = session.get(Project, old.project_id)
                raise StoreError(f"{w}: prompt id {pid!r} already belongs to project {other.name!r} (ids are unique "
                                 "across the store; another --project?)", code="conflict")
            if (old.text, old.topic) != (p.text, p.topic):
                raise StoreError(f"{w}: prompt id {pid!r} already exists with different content", code="conflict")
            continue
        session.add(Prompt(id=pid, project_id=project_id, text=p.text, topic=p.topic, meta=_meta(p.meta, w)))
        added += 1
    session.flush()
    return added


def _existing(session: Session, model: type, ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in range(0, len(ids), 500):
        for obj in session.scalars(select(model).where(model.id.in_(ids[k:k + 500]))):
            out[obj.id] = obj
    return out


def add_responses(
    session: Session, *, project_id: int, responses: Iterable[ResponseIn | Mapping[str, Any]],
    where: str | Sequence[str] = "responses",
) -> int:
    """Insert responses to stored prompts of the project; identical re-inserts are skipped."""
    _project(session, project_id)
    raw = list(responses)
    locs = _locs(where, len(raw))
    items = [_as(ResponseIn, r, w) for r, w in zip(raw, locs, strict=True)]
    for r, w in zip(items, locs, strict=True):
        _ident(r.id, f"{w}.id")
        _ident(r.prompt_id, f"{w}.prompt_id")
        _text(r.text, f"{w}.text")
        _text(r.source, f"{w}.source", max_len=200, allow_empty=True)
        _meta(r.meta, f"{w}.meta")
    seen = _unique_by_id(items, locs, "response")
    prompts = _existing(session, Prompt, sorted({r.prompt_id for r, _ in seen.values()}))
    existing = _existing(session, Response, list(seen))
    added = 0
    for rid, (r, w) in seen.items():
        p = prompts.get(r.prompt_id)
        if p is None or p.project_id != project_id:
            raise StoreError(f"{w}: unknown prompt id {r.prompt_id!r}{_elsewhere(session, p)}", code="not_found")
        old = existing.get(rid)
        if old is not None:
            if (old.prompt_id, old.text, old.source) != (r.prompt_id, r.text, r.source):
                raise StoreError(f"{w}: response id {rid!r} already exists with different content",
                                 code="conflict")
            continue
        session.add(Response(id=rid, prompt_id=r.prompt_id, text=r.text, source=r.source, meta=_meta(r.meta, w)))
        added += 1
    session.flush()
    return added


def add_pairs(
    session: Session, *, project_id: int, pairs: Iterable[PairIn | Mapping[str, Any]],
    where: str | Sequence[str] = "pairs",
) -> int:
    """Insert comparison pairs of two distinct stored responses to the same prompt."""
    _project(session, project_id)
    raw = list(pairs)
    locs = _locs(where, len(raw))
    items = [_as(PairIn, p, w) for p, w in zip(raw, locs, strict=True)]
    for p, w in zip(items, locs, strict=True):
        for f in ("id", "prompt_id", "response_a_id", "response_b_id"):
            _ident(getattr(p, f), f"{w}.{f}")
        _meta(p.meta, f"{w}.meta")
        if p.response_a_id == p.response_b_id:
            raise StoreError(f"{w}: response_a_id and response_b_id are both {p.response_a_id!r}")
    seen = _unique_by_id(items, locs, "pair")
    responses = _existing(session, Response, sorted(
        {p.response_a_id for p, _ in seen.values()} | {p.response_b_id for p, _ in seen.values()}))
    prompts = _existing(session, Prompt, sorted({p.prompt_id for p, _ in seen.values()}))
    existing = _existing(session, Pair, list(seen))
    added = 0
    for pid, (p, w) in seen.items():
        pr = prompts.get(p.prompt_id)
        if pr is None or pr.project_id != project_id:
            raise StoreError(f"{w}: unknown prompt id {p.prompt_id!r}{_elsewhere(session, pr)}", code="not_found")
        for side in (p.response_a_id, p.response_b_id):
            r = responses.get(side)
            if r is None:
                raise StoreError(f"{w}: unknown response id {side!r}", code="not_found")
            if r.prompt_id != p.prompt_id:
                raise StoreError(f"{w}: response {side!r} answers prompt {r.prompt_id!r}, not {p.prompt_id!r}")
        old = existing.get(pid)
        if old is not None:
            if (old.prompt_id, old.response_a_id, old.response_b_id) != (p.prompt_id, p.response_a_id, p.response_b_id):
                raise StoreError(f"{w}: pair id {pid!r} already exists with different content", code="conflict")
            continue
        session.add(Pair(id=pid, project_id=project_id, prompt_id=p.prompt_id, response_a_id=p.response_a_id,
                         response_b_id=p.response_b_id, meta=_meta(p.meta, w)))
        added += 1
    session.flush()
    return added


def _pair_query():  # noqa: ANN202
    ra, rb = aliased(Response), aliased(Response)
    return (
        select(Pair, Prompt, ra, rb)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .join(ra, ra.id == Pair.response_a_id)
        .join(rb, rb.id == Pair.response_b_id)
    )


def _pair_info(p: Pair, pr: Prompt, a: Response, b: Response) -> PairInfo:
    return PairInfo(p.id, pr.id, pr.text, pr.topic, a.id, a.text, a.source, b.id, b.text, b.source, dict(p.meta or {}))


def list_pairs(
    session: Session, *, project_id: int, topic: str | None = None, pair_ids: Sequence[str] | None = None,
) -> list[PairInfo]:
    """Pairs of the project (optionally of one topic or the given ids), with texts and sources."""
    q = _pair_query().where(Pair.project_id == project_id).order_by(Pair.id)
    if topic is not None:
        q = q.where(Prompt.topic == topic)
    if pair_ids is not None:
        ids = sorted(set(pair_ids))
        out = [_pair_info(*row) for k in range(0, len(ids), 500)
               for row in session.execute(q.where(Pair.id.in_(ids[k:k + 500])))]
        return sorted(out, key=lambda p: p.id)
    return [_pair_info(*row) for row in session.execute(q)]


def get_pair(session: Session, *, pair_id: str) -> PairInfo:
    row = session.execute(_pair_query().where(Pair.id == pair_id)).first()
    if row is None:
        raise StoreError(f"pair {pair_id!r} not found", code="not_found")
    return _pair_info(*row)


def eval_prompt_ids(session: Session, *, project_id: int) -> set[str]:
    """Ids of the prompts that blind A/B (``eval``) rounds compare checkpoints on: held out, so
    they should not become training pairs."""
    q = (select(Pair.prompt_id).join(RoundItem, RoundItem.pair_id == Pair.id).join(Round, Round.id == RoundItem.round_id)
         .where(Round.project_id == project_id, Round.kind == "eval").distinct())
    return set(session.scalars(q))


def list_prompts(session: Session, *, project_id: int, topic: str | None = None) -> list[PromptIn]:
    q = select(Prompt).where(Prompt.project_id == project_id).order_by(Prompt.id)
    if topic is not None:
        q = q.where(Prompt.topic == topic)
    return [PromptIn(p.id, p.text, p.topic, dict(p.meta or {})) for p in session.scalars(q)]
