"""Typed, keyword-only operations on the preference store.

Every function takes an open ``Session`` and does its work inside the caller's
transaction (``with db.session_scope(engine) as s: ops.f(s, ...)``: one op, one
transaction); nothing commits here. Bad input raises ``StoreError`` naming the place;
``StoreError.code`` (``invalid`` | ``not_found`` | ``conflict`` | ``forbidden``) lets the
web layer choose a status code.

Assignment (``next_task`` / ``submit_judgement``) is atomic under concurrency on SQLite
(one process, many threads: transactions take the write lock up front, see db.py) and
on PostgreSQL with several processes: overlap, no-double-assignment, task order and
idempotency are unique constraints (schema.py); a clash rolls back a savepoint and the
next candidate is tried. No state is kept in memory between calls.

Rules of ``next_task`` (for one rater in one round):

1. a task the rater already holds (leased, expired or not) is handed back, lease renewed;
2. leases of other raters that expired return to the pool (fresh tasks are deleted,
   freeing their slot; planted duplicates go back to ``scheduled``);
3. a planted duplicate whose ``due_seq`` has come is served (same pair, sides swapped);
4. otherwise a fresh item with a free slot (fewer than ``overlap`` raters) that this
   rater never had: specialty matches first, then items closest to full overlap, then
   the round's shuffled order. Routing: a rater with no specialties takes anything;
   ``fallback='always'`` lets a specialist take other domains when theirs are done,
   ``'never'`` never, ``'after'`` only once the round is ``fallback_after_s`` old.

A planted duplicate is scheduled when a fresh task is judged, with probability
``duplicate_rate`` (a seeded hash of round, pair and rater), due at least
``duplicate_gap`` other tasks later.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import and_, case, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from preflab.store.schema import (
    FALLBACKS,
    MAX_ID_LEN,
    MAX_TEXT_LEN,
    ROLES,
    ROUND_KINDS,
    ROUND_STATUSES,
    ROUTINGS,
    Alert,
    Assignment,
    DuplicateLink,
    Event,
    GuidelineVersion,
    Judgement,
    Pair,
    Project,
    Prompt,
    Rater,
    Response,
    Round,
    RoundItem,
    utcnow,
)

MAX_RATIONALE = 5_000
MAX_KEY = 128
_RETRIES = 25


class StoreError(ValueError):
    """Bad input or a state conflict in the store; the message names the place."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


# ---- records returned to callers (plain dataclasses, no ORM objects) ------------------


@dataclass(frozen=True)
class RaterInfo:
    id: int
    project_id: int
    name: str
    role: str
    specialties: tuple[str, ...]
    hourly_rate: float
    active: bool


@dataclass(frozen=True)
class GuidelineInfo:
    id: int
    project_id: int
    label: str
    text: str
    rubric: tuple[str, ...]
    created_at: dt.datetime


@dataclass(frozen=True)
class PromptIn:
    id: str
    text: str
    topic: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResponseIn:
    id: str
    prompt_id: str
    text: str
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairIn:
    id: str
    prompt_id: str
    response_a_id: str
    response_b_id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairInfo:
    id: str
    prompt_id: str
    prompt_text: str
    topic: str
    response_a_id: str
    response_a_text: str
    response_a_source: str
    response_b_id: str
    response_b_text: str
    response_b_source: str
    meta: dict[str, Any]


@dataclass(frozen=True)
class RoundInfo:
    id: int
    project_id: int
    name: str
    kind: str
    guideline_version_id: int | None
    guideline_label: str | None
    overlap: int
    duplicate_rate: float
    duplicate_gap: int
    allow_ties: bool
    min_rationale_chars: int
    routing: str
    fallback: str
    fallback_after_s: float
    lease_s: float
    status: str
    seed: int
    n_items: int
    created_at: dt.datetime
    meta: dict[str, Any]


@dataclass(frozen=True)
class Task:
    """One comparison as a rater sees it: canonical ids, screen sides, no model identity."""

    assignment_id: int
    round_id: int
    prompt_text: str
    topic: str
    left_id: str
    left_text: str
    right_id: str
    right_text: str
    allow_ties: bool
    min_rationale_chars: int
    lease_expires_at: dt.datetime
    done: int
    total: int


@dataclass(frozen=True)
class Progress:
    """A rater's progress in a round; ``total`` counts what they could still be given."""

    done: int
    total: int


@dataclass(frozen=True)
class JudgementRecord:
    id: int
    assignment_id: int
    round_id: int
    pair_id: str
    rater_id: int
    winner_id: str | None
    is_tie: bool
    strength: int
    rationale: str
    time_on_task_s: float
    idempotency_key: str
    guideline_version_id: int | None
    is_duplicate: bool
    created_at: dt.datetime
    replayed: bool = False  # True when an earlier submission with the same key was returned


@dataclass(frozen=True)
class JudgementRow:
    """A judgement with its context, for analysis and export (admin side: includes sources)."""

    judgement_id: int
    assignment_id: int
    round_id: int
    round_kind: str
    pair_id: str
    prompt_id: str
    prompt_text: str
    topic: str
    rater_id: int
    rater_name: str
    response_a_id: str
    response_b_id: str
    source_a: str
    source_b: str
    left_id: str
    winner_id: str | None
    choice: Literal["a", "b", "tie"]
    strength: int
    rationale: str
    time_on_task_s: float
    is_duplicate: bool
    guideline_label: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class DuplicatePair:
    """A rater's answers to a pair and its planted (side-swapped) duplicate."""

    round_id: int
    rater_id: int
    rater_name: str
    pair_id: str
    first: Literal["a", "b", "tie"]
    second: Literal["a", "b", "tie"]
    first_strength: int
    second_strength: int
    gap: int  # tasks served in between

    @property
    def consistent(self) -> bool:
        return self.first == self.second


@dataclass(frozen=True)
class PreferenceExample:
    pair_id: str
    prompt_text: str
    topic: str
    chosen_text: str
    rejected_text: str
    chosen_id: str
    rejected_id: str
    strength: int
    rater: str
    is_tie: bool  # chosen/rejected are the canonical a/b order then
    guideline_version: str | None
    round_id: int


@dataclass(frozen=True)
class RaterProgress:
    rater_id: int
    rater_name: str
    done: int
    leased: int
    duplicates_done: int
    time_on_task_s: float


@dataclass(frozen=True)
class RoundProgress:
    round_id: int
    n_items: int
    items_complete: int  # items with `overlap` fresh judgements
    n_judgements: int
    raters: tuple[RaterProgress, ...]


@dataclass(frozen=True)
class AlertInfo:
    id: int
    project_id: int
    kind: str
    rater_id: int | None
    round_id: int | None
    message: str
    payload: dict[str, Any]
    created_at: dt.datetime
    resolved: bool


@dataclass(frozen=True)
class EventInfo:
    id: int
    project_id: int | None
    kind: str
    subject: str
    payload: dict[str, Any]
    created_at: dt.datetime


# ---- helpers ----------------------------------------------------------------------------


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return utcnow()
    if now.tzinfo is not None:
        now = now.astimezone(dt.UTC).replace(tzinfo=None)
    return now


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts`` (seeded routing decisions)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _text(value: Any, where: str, *, max_len: int = MAX_TEXT_LEN, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise StoreError(f"{where}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise StoreError(f"{where}: must not be empty")
    if len(value) > max_len:
        raise StoreError(f"{where}: longer than {max_len} characters ({len(value)})")
    return value


def _ident(value: Any, where: str) -> str:
    s = _text(value, where, max_len=MAX_ID_LEN)
    if s != s.strip():
        raise StoreError(f"{where}: id {s!r} has leading/trailing whitespace")
    return s


def _meta(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StoreError(f"{where}: expected an object, got {type(value).__name__}")
    return dict(value)


def _project(session: Session, project_id: int) -> Project:
    p = session.get(Project, project_id)
    if p is None:
        raise StoreError(f"project {project_id} not found", code="not_found")
    return p


def _rater(session: Session, rater_id: int) -> Rater:
    r = session.get(Rater, rater_id)
    if r is None:
        raise StoreError(f"rater {rater_id} not found", code="not_found")
    return r


def _round(session: Session, round_id: int) -> Round:
    r = session.get(Round, round_id)
    if r is None:
        raise StoreError(f"round {round_id} not found", code="not_found")
    return r


def _rater_info(r: Rater) -> RaterInfo:
    return RaterInfo(r.id, r.project_id, r.name, r.role, tuple(r.specialties or ()), r.hourly_rate, r.active)


def _guideline_info(g: GuidelineVersion) -> GuidelineInfo:
    return GuidelineInfo(g.id, g.project_id, g.label, g.text, tuple(g.rubric or ()), g.created_at)


def hash_token(token: str) -> str:
    """SHA-256 hex of an API token (what the store keeps)."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---- projects, raters, guidelines ------------------------------------------------------


def create_project(session: Session, *, name: str) -> int:
    """Create a project; a taken name is a conflict."""
    name = _text(name, "project.name", max_len=200)
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise StoreError(f"project.name: {name!r} already exists", code="conflict")
    p = Project(name=name)
    session.add(p)
    session.flush()
    return p.id


def project_id(session: Session, *, name: str) -> int | None:
    """The id of the project called ``name``, or None."""
    return session.scalar(select(Project.id).where(Project.name == name))


def ensure_project(session: Session, *, name: str) -> int:
    """The id of project ``name``, created if missing."""
    pid = project_id(session, name=name)
    return pid if pid is not None else create_project(session, name=name)


def create_rater(
    session: Session,
    *,
    project_id: int,
    name: str,
    password: str | None = None,
    password_hash: str | None = None,
    role: str = "rater",
    specialties: Sequence[str] = (),
    hourly_rate: float = 0.0,
    active: bool = True,
) -> int:
    """Create a rater (name unique per project). ``password`` is hashed with argon2id;
    a caller that already hashed passes ``password_hash`` instead."""
    _project(session, project_id)
    name = _text(name, "rater.name", max_len=200)
    if role not in ROLES:
        raise StoreError(f"rater.role: must be one of {list(ROLES)}, got {role!r}")
    if isinstance(specialties, str) or not all(isinstance(s, str) and s for s in specialties):
        raise StoreError(f"rater.specialties: expected a list of domain names, got {specialties!r}")
    if not isinstance(hourly_rate, (int, float)) or hourly_rate < 0:
        raise StoreError(f"rater.hourly_rate: must be a number >= 0, got {hourly_rate!r}")
    if password is not None and password_hash is not None:
        raise StoreError("rater: give password or password_hash, not both")
    if session.scalar(select(Rater.id).where(Rater.project_id == project_id, Rater.name == name)):
        raise StoreError(f"rater.name: {name!r} already exists in project {project_id}", code="conflict")
    if password is not None:
        password_hash = _hash_password(_text(password, "rater.password", max_len=1000))
    r = Rater(project_id=project_id, name=name, role=role, specialties=list(specialties),
              hourly_rate=float(hourly_rate), password_hash=password_hash, active=active)
    session.add(r)
    session.flush()
    return r.id


def _hash_password(password: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


def set_password(session: Session, *, rater_id: int, password: str) -> None:
    """Replace a rater's password (stored as an argon2id hash)."""
    _rater(session, rater_id).password_hash = _hash_password(_text(password, "rater.password", max_len=1000))


def check_password(session: Session, *, project_id: int, name: str, password: str) -> RaterInfo | None:
    """The active rater ``name`` if ``password`` matches, else None."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    r = session.scalar(select(Rater).where(Rater.project_id == project_id, Rater.name == name))
    if r is None or not r.active or not r.password_hash:
        return None
    try:
        PasswordHasher().verify(r.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    return _rater_info(r)


def issue_api_token(session: Session, *, rater_id: int) -> str:
    """A new API token for the rater (returned once; only its SHA-256 is stored)."""
    token = "pl_" + secrets.token_urlsafe(32)
    set_token_hash(session, rater_id=rater_id, token_hash=hash_token(token))
    return token


def set_token_hash(session: Session, *, rater_id: int, token_hash: str | None) -> None:
    """Store (or clear, with None) the SHA-256 hex of a rater's API token."""
    _rater(session, rater_id).token_hash = token_hash


def rater_by_token(session: Session, *, token: str) -> RaterInfo | None:
    """The active rater owning API ``token``, or None."""
    return rater_by_token_hash(session, token_hash=hash_token(token))


def rater_by_token_hash(session: Session, *, token_hash: str) -> RaterInfo | None:
    r = session.scalar(select(Rater).where(Rater.token_hash == token_hash))
    return _rater_info(r) if r is not None and r.active else None


def get_rater(session: Session, *, rater_id: int) -> RaterInfo:
    return _rater_info(_rater(session, rater_id))


def rater_by_name(session: Session, *, project_id: int, name: str) -> RaterInfo | None:
    r = session.scalar(select(Rater).where(Rater.project_id == project_id, Rater.name == name))
    return _rater_info(r) if r is not None else None


def password_hash_of(session: Session, *, rater_id: int) -> str | None:
    """The stored argon2 hash (for a web layer that verifies passwords itself)."""
    return _rater(session, rater_id).password_hash


def list_raters(session: Session, *, project_id: int, active_only: bool = False) -> list[RaterInfo]:
    q = select(Rater).where(Rater.project_id == project_id).order_by(Rater.id)
    if active_only:
        q = q.where(Rater.active.is_(True))
    return [_rater_info(r) for r in session.scalars(q)]


def update_rater(
    session: Session,
    *,
    rater_id: int,
    active: bool | None = None,
    specialties: Sequence[str] | None = None,
    hourly_rate: float | None = None,
    role: str | None = None,
) -> RaterInfo:
    """Change the given fields of a rater (None leaves a field as it is)."""
    r = _rater(session, rater_id)
    if role is not None:
        if role not in ROLES:
            raise StoreError(f"rater.role: must be one of {list(ROLES)}, got {role!r}")
        r.role = role
    if active is not None:
        r.active = bool(active)
    if specialties is not None:
        if isinstance(specialties, str) or not all(isinstance(s, str) and s for s in specialties):
            raise StoreError(f"rater.specialties: expected a list of domain names, got {specialties!r}")
        r.specialties = list(specialties)
    if hourly_rate is not None:
        if hourly_rate < 0:
            raise StoreError(f"rater.hourly_rate: must be >= 0, got {hourly_rate!r}")
        r.hourly_rate = float(hourly_rate)
    session.flush()
    return _rater_info(r)


def create_guideline_version(
    session: Session, *, project_id: int, label: str, text: str = "", rubric: Sequence[str] = ()
) -> int:
    """Add guideline version ``label`` (e.g. "v2") with its rubric items; newest = latest created."""
    _project(session, project_id)
    label = _text(label, "guideline.label", max_len=64)
    _text(text, "guideline.text", max_len=200_000, allow_empty=True)
    if isinstance(rubric, str) or not all(isinstance(x, str) for x in rubric):
        raise StoreError(f"guideline.rubric: expected a list of strings, got {rubric!r}")
    if session.scalar(select(GuidelineVersion.id).where(
            GuidelineVersion.project_id == project_id, GuidelineVersion.label == label)):
        raise StoreError(f"guideline.label: {label!r} already exists", code="conflict")
    g = GuidelineVersion(project_id=project_id, label=label, text=text, rubric=list(rubric))
    session.add(g)
    session.flush()
    return g.id


def list_guidelines(session: Session, *, project_id: int) -> list[GuidelineInfo]:
    """Guideline versions, oldest first."""
    q = select(GuidelineVersion).where(GuidelineVersion.project_id == project_id).order_by(
        GuidelineVersion.created_at, GuidelineVersion.id)
    return [_guideline_info(g) for g in session.scalars(q)]


def latest_guideline(session: Session, *, project_id: int) -> GuidelineInfo | None:
    gs = list_guidelines(session, project_id=project_id)
    return gs[-1] if gs else None


def get_guideline(session: Session, *, guideline_id: int) -> GuidelineInfo:
    g = session.get(GuidelineVersion, guideline_id)
    if g is None:
        raise StoreError(f"guideline version {guideline_id} not found", code="not_found")
    return _guideline_info(g)


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
            if (old.project_id, old.text, old.topic) != (project_id, p.text, p.topic):
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
            raise StoreError(f"{w}: unknown prompt id {r.prompt_id!r}", code="not_found")
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
            raise StoreError(f"{w}: unknown prompt id {p.prompt_id!r}", code="not_found")
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
        wanted = set(pair_ids)
        return [_pair_info(*row) for row in session.execute(q) if row[0].id in wanted]
    return [_pair_info(*row) for row in session.execute(q)]


def get_pair(session: Session, *, pair_id: str) -> PairInfo:
    row = session.execute(_pair_query().where(Pair.id == pair_id)).first()
    if row is None:
        raise StoreError(f"pair {pair_id!r} not found", code="not_found")
    return _pair_info(*row)


def list_prompts(session: Session, *, project_id: int, topic: str | None = None) -> list[PromptIn]:
    q = select(Prompt).where(Prompt.project_id == project_id).order_by(Prompt.id)
    if topic is not None:
        q = q.where(Prompt.topic == topic)
    return [PromptIn(p.id, p.text, p.topic, dict(p.meta or {})) for p in session.scalars(q)]


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
    if session.scalar(select(Round.id).where(Round.project_id == project_id, Round.name == name)):
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


# ---- assignment -------------------------------------------------------------------------


def _routing(rnd: Round, rater: Rater, now: dt.datetime) -> tuple[list[str], bool]:
    """(the rater's specialties to try first, whether other domains are allowed)."""
    specs = [s for s in (rater.specialties or []) if s]
    if rnd.routing == "any" or not specs:
        return [], True
    if rnd.fallback == "always":
        return specs, True
    if rnd.fallback == "after" and (now - rnd.created_at).total_seconds() >= rnd.fallback_after_s:
        return specs, True
    return specs, False


def _fresh(rnd: Round, rater: Rater):  # noqa: ANN202 - a Select
    """Items with a free slot that this rater never had as a fresh task.

    ``RoundItem.filled`` counts slotted assignments (kept in step with them by next_task
    and the lease reclaim), so this is an index scan, not a count per item.
    """
    mine = exists().where(Assignment.item_id == RoundItem.id, Assignment.rater_id == rater.id,
                          Assignment.is_duplicate.is_(False))
    return select(RoundItem.id).where(RoundItem.round_id == rnd.id, RoundItem.filled < rnd.overlap, ~mine)


def _pick_fresh(session: Session, rnd: Round, rater: Rater, now: dt.datetime, tried: set[int]) -> int | None:
    """The next fresh item: specialty first, then fullest, then the round's seeded order."""
    q = _fresh(rnd, rater)
    if tried:
        q = q.where(RoundItem.id.not_in(tried))
    # (filled desc, position desc) is a backward scan of ix_round_item_pick*; positions are a shuffle
    q = q.order_by(RoundItem.filled.desc(), RoundItem.position.desc()).limit(1)
    specs, others = _routing(rnd, rater, now)
    if specs:
        found = session.scalar(q.where(RoundItem.domain.in_(specs)))
        if found is not None or not others:
            return found
    return session.scalar(q)


def _n_fresh(session: Session, rnd: Round, rater: Rater, now: dt.datetime) -> int:
    """How many items ``_pick_fresh`` could still offer: open items minus the rater's own
    (two index counts instead of a correlated scan of the whole round)."""
    specs, others = _routing(rnd, rater, now)
    open_items = select(func.count()).select_from(RoundItem).where(
        RoundItem.round_id == rnd.id, RoundItem.filled < rnd.overlap)
    own = (select(func.count()).select_from(Assignment).join(RoundItem, RoundItem.id == Assignment.item_id)
           .where(Assignment.round_id == rnd.id, Assignment.rater_id == rater.id,
                  Assignment.is_duplicate.is_(False), RoundItem.filled < rnd.overlap))
    if specs and not others:
        open_items = open_items.where(RoundItem.domain.in_(specs))
        own = own.where(RoundItem.domain.in_(specs))
    return (session.scalar(open_items) or 0) - (session.scalar(own) or 0)


def _next_seq(session: Session, round_id: int, rater_id: int) -> int:
    m = session.scalar(select(func.max(Assignment.seq)).where(
        Assignment.round_id == round_id, Assignment.rater_id == rater_id))
    return 0 if m is None else m + 1


def _reclaim_expired(session: Session, round_id: int, now: dt.datetime) -> None:
    expired = and_(Assignment.round_id == round_id, Assignment.state == "leased",
                   Assignment.lease_expires_at < now)
    # RETURNING: only rows this transaction really deleted free a slot (a concurrent
    # reclaimer that lost the race deletes nothing and decrements nothing)
    freed = session.execute(delete(Assignment).where(expired, Assignment.is_duplicate.is_(False))
                            .returning(Assignment.item_id).execution_options(synchronize_session=False)).scalars().all()
    for item_id, n in Counter(freed).items():
        session.execute(update(RoundItem).where(RoundItem.id == item_id).values(filled=RoundItem.filled - n)
                        .execution_options(synchronize_session=False))
    session.execute(update(Assignment).where(expired, Assignment.is_duplicate.is_(True))
                    .values(state="scheduled", seq=None, lease_expires_at=None, leased_at=None)
                    .execution_options(synchronize_session=False))


def _try(session: Session, fn) -> bool:  # noqa: ANN001
    """Run ``fn`` in a savepoint; False (and rolled back) if it hit a unique constraint."""
    try:
        with session.begin_nested():
            fn()
            session.flush()
        return True
    except IntegrityError:
        return False


def next_task(session: Session, *, round_id: int, rater_id: int, now: dt.datetime | None = None) -> Task | None:
    """Lease the rater's next comparison in the round (rules in the module docstring).

    Returns None when the round is closed or nothing is left for this rater now.
    """
    now = _now(now)
    rnd = _round(session, round_id)
    # lock the rater row: one rater's concurrent requests queue here instead of racing
    # (no-op on SQLite, whose BEGIN IMMEDIATE already serialises writers)
    rater = session.scalar(select(Rater).where(Rater.id == rater_id).with_for_update())
    if rater is None:
        raise StoreError(f"rater {rater_id} not found", code="not_found")
    if rater.project_id != rnd.project_id:
        raise StoreError(f"rater {rater_id} is not in the project of round {round_id}", code="forbidden")
    if not rater.active:
        raise StoreError(f"rater {rater.name!r} is inactive", code="forbidden")
    if rnd.status != "open":
        return None
    lease_until = now + dt.timedelta(seconds=rnd.lease_s)
    tried: set[int] = set()
    for _ in range(_RETRIES):
        # 1. the task this rater already holds
        held = session.scalar(select(Assignment).where(
            Assignment.round_id == round_id, Assignment.rater_id == rater_id, Assignment.state == "leased")
            .order_by(Assignment.seq).limit(1))
        if held is not None:
            held.lease_expires_at = lease_until
            session.flush()
            return _task(session, rnd, held, now)
        # 2. expired leases of others go back to the pool
        _reclaim_expired(session, round_id, now)
        seq = _next_seq(session, round_id, rater_id)
        # 3. a planted duplicate that has come due
        dup = session.scalar(select(Assignment).where(
            Assignment.round_id == round_id, Assignment.rater_id == rater_id, Assignment.state == "scheduled",
            Assignment.due_seq <= seq).order_by(Assignment.due_seq, Assignment.id).limit(1))
        if dup is not None:
            def lease_dup(a: Assignment = dup, s: int = seq) -> None:
                session.execute(update(Assignment).where(Assignment.id == a.id, Assignment.state == "scheduled")
                                .values(state="leased", seq=s, leased_at=now, lease_expires_at=lease_until)
                                .execution_options(synchronize_session=False))
            if _try(session, lease_dup):
                session.refresh(dup)
                if dup.state == "leased" and dup.seq == seq:
                    return _task(session, rnd, dup, now)
            continue
        # 4. a fresh item with a free slot
        item_id = _pick_fresh(session, rnd, rater, now, tried)
        if item_id is None:
            return None
        item = session.get(RoundItem, item_id)
        pair = session.get(Pair, item.pair_id)
        used = set(session.scalars(select(Assignment.slot).where(
            Assignment.item_id == item.id, Assignment.slot.is_not(None))))
        free = [k for k in range(rnd.overlap) if k not in used]
        if not free:
            tried.add(item.id)
            continue
        left = pair.response_a_id if _unit("side", rnd.seed, round_id, pair.id, rater_id) < 0.5 else pair.response_b_id
        a = Assignment(round_id=round_id, item_id=item.id, pair_id=pair.id, rater_id=rater_id,
                       left_response_id=left, is_duplicate=False, slot=free[0], seq=seq, state="leased",
                       leased_at=now, lease_expires_at=lease_until, created_at=now)

        def take(a: Assignment = a, item_id: int = item.id) -> None:
            n = session.execute(update(RoundItem).where(RoundItem.id == item_id, RoundItem.filled < rnd.overlap)
                                .values(filled=RoundItem.filled + 1)
                                .execution_options(synchronize_session=False)).rowcount
            if n != 1:  # filled up meanwhile
                raise IntegrityError("item full", None, Exception("full"))
            session.add(a)

        if _try(session, take):
            return _task(session, rnd, a, now)
        if a in session:
            session.expunge(a)
        # a clash: another rater took the slot, or this rater got a task concurrently (step 1 finds it)
    raise StoreError(f"round {round_id}: could not lease a task after {_RETRIES} attempts (heavy contention)",
                     code="conflict")


def _task(session: Session, rnd: Round, a: Assignment, now: dt.datetime) -> Task:
    lr, rr = aliased(Response), aliased(Response)
    right_col = case((Pair.response_a_id == a.left_response_id, Pair.response_b_id), else_=Pair.response_a_id)
    prompt, left, right = session.execute(
        select(Prompt, lr, rr).select_from(Pair).join(Prompt, Prompt.id == Pair.prompt_id)
        .join(lr, lr.id == a.left_response_id).join(rr, rr.id == right_col).where(Pair.id == a.pair_id)).one()
    rater = session.get(Rater, a.rater_id)
    p = _progress(session, rnd, rater, now)
    return Task(a.id, rnd.id, prompt.text, prompt.topic, left.id, left.text, right.id, right.text,
                rnd.allow_ties, rnd.min_rationale_chars, a.lease_expires_at, p.done, p.total)


def get_task(session: Session, *, assignment_id: int, rater_id: int, now: dt.datetime | None = None) -> Task:
    """The task of an assignment the rater holds (e.g. after a page reload)."""
    a = session.get(Assignment, assignment_id)
    if a is None or a.rater_id != rater_id:
        raise StoreError(f"assignment {assignment_id} not found", code="not_found")
    return _task(session, _round(session, a.round_id), a, _now(now))


def progress(session: Session, *, round_id: int, rater_id: int, now: dt.datetime | None = None) -> Progress:
    """Done and total for a rater: total = done + held + fresh items they could still get
    + scheduled duplicates that can come due (an estimate while others are rating)."""
    return _progress(session, _round(session, round_id), _rater(session, rater_id), _now(now))


def _progress(session: Session, rnd: Round, rater: Rater, now: dt.datetime) -> Progress:
    rows = session.execute(select(Assignment.state, func.count(), func.max(Assignment.seq)).where(
        Assignment.round_id == rnd.id, Assignment.rater_id == rater.id).group_by(Assignment.state)).all()
    counts = {state: n for state, n, _ in rows}
    max_seq = max((m for _, _, m in rows if m is not None), default=-1)
    done, held = counts.get("done", 0), counts.get("leased", 0)
    fresh = _n_fresh(session, rnd, rater, now) if rnd.status == "open" else 0
    dups = 0
    if counts.get("scheduled"):
        reach = max_seq + 1 + held + fresh
        dups = session.scalar(select(func.count()).select_from(Assignment).where(
            Assignment.round_id == rnd.id, Assignment.rater_id == rater.id, Assignment.state == "scheduled",
            Assignment.due_seq <= reach)) or 0
    return Progress(done=done, total=done + held + fresh + dups)


def _choice(winner: str | None, pair: Pair) -> Literal["a", "b", "tie"]:
    if winner is None:
        return "tie"
    return "a" if winner == pair.response_a_id else "b"


def _record(j: Judgement, a: Assignment, *, replayed: bool) -> JudgementRecord:
    return JudgementRecord(j.id, j.assignment_id, j.round_id, j.pair_id, j.rater_id, j.winner_id,
                           j.winner_id is None, j.strength, j.rationale, j.time_on_task_s, j.idempotency_key,
                           j.guideline_version_id, a.is_duplicate, j.created_at, replayed)


def submit_judgement(
    session: Session,
    *,
    assignment_id: int,
    rater_id: int,
    choice: str,
    strength: int,
    rationale: str,
    time_on_task_s: float,
    idempotency_key: str,
    now: dt.datetime | None = None,
) -> JudgementRecord:
    """Store a rater's answer to an assignment against the CANONICAL response ids.

    ``choice`` is ``'left'``, ``'right'``, ``'tie'`` or the winning response id.
    ``strength`` 0..3 (0 tie/negligible, 1 slightly, 2 clearly, 3 much better); a tie is
    stored with strength 0 and ``winner_id`` NULL. Idempotent on ``idempotency_key``: the
    same key returns the stored judgement (``replayed=True``) and stores nothing new; the
    key reused for another assignment is a conflict. Judging a fresh task may schedule a
    planted duplicate (module docstring).
    """
    now = _now(now)
    key = _text(idempotency_key, "idempotency_key", max_len=MAX_KEY)
    prior = _by_key(session, rater_id, key)
    if prior is not None:
        return _replay(session, prior, assignment_id)
    a = session.get(Assignment, assignment_id)
    if a is None or a.rater_id != rater_id:
        raise StoreError(f"assignment {assignment_id} not found (an expired lease returns to the pool)",
                         code="not_found")
    rnd = _round(session, a.round_id)
    if a.state == "done":
        prior = _by_key(session, rater_id, key)  # a same-key request may have committed meanwhile
        if prior is not None:
            return _replay(session, prior, assignment_id)
        raise StoreError(f"assignment {assignment_id} is already judged", code="conflict")
    if rnd.status != "open":
        raise StoreError(f"round {rnd.name!r} is closed", code="conflict")
    pair = session.get(Pair, a.pair_id)
    if not isinstance(choice, str):
        raise StoreError(f"choice: expected 'left', 'right', 'tie' or a response id, got {choice!r}")
    right = pair.response_b_id if a.left_response_id == pair.response_a_id else pair.response_a_id
    winner: str | None
    if choice == "left":
        winner = a.left_response_id
    elif choice == "right":
        winner = right
    elif choice == "tie":
        winner = None
    elif choice in (pair.response_a_id, pair.response_b_id):
        winner = choice
    else:
        raise StoreError(f"choice: expected 'left', 'right', 'tie' or a response id of this pair, got {choice!r}")
    if winner is None and not rnd.allow_ties:
        raise StoreError(f"choice: round {rnd.name!r} does not allow ties")
    if not isinstance(strength, int) or isinstance(strength, bool) or not 0 <= strength <= 3:
        raise StoreError(f"strength: must be an integer 0..3, got {strength!r}")
    if winner is None:
        strength = 0
    rationale = _text(rationale, "rationale", max_len=MAX_RATIONALE, allow_empty=True)
    if len(rationale.strip()) < rnd.min_rationale_chars:
        raise StoreError(f"rationale: at least {rnd.min_rationale_chars} characters required "
                         f"(got {len(rationale.strip())})")
    if isinstance(time_on_task_s, bool) or not isinstance(time_on_task_s, (int, float)) \
            or not 0 <= time_on_task_s < 86_400 * 7:
        raise StoreError(f"time_on_task_s: must be a number of seconds >= 0, got {time_on_task_s!r}")
    j = Judgement(assignment_id=a.id, round_id=a.round_id, pair_id=a.pair_id, rater_id=rater_id,
                  winner_id=winner, strength=strength, rationale=rationale, time_on_task_s=float(time_on_task_s),
                  idempotency_key=key, guideline_version_id=rnd.guideline_version_id, created_at=now)

    def insert() -> None:
        session.add(j)
        session.flush()
        n = session.execute(update(Assignment).where(Assignment.id == a.id, Assignment.state != "done")
                            .values(state="done", done_at=now, lease_expires_at=None)
                            .execution_options(synchronize_session=False)).rowcount
        if n != 1:
            raise IntegrityError("assignment already done", None, Exception("done"))

    if not _try(session, insert):
        prior = _by_key(session, rater_id, key)
        if prior is not None:
            return _replay(session, prior, assignment_id)
        raise StoreError(f"assignment {assignment_id} is already judged", code="conflict")
    session.refresh(a)
    if a.seq is None:  # a duplicate judged after its lease lapsed back to 'scheduled'
        a.seq = _next_seq(session, a.round_id, rater_id)
    if not a.is_duplicate:
        _maybe_plant_duplicate(session, rnd, a, now)
    session.flush()
    return _record(j, a, replayed=False)


def _by_key(session: Session, rater_id: int, key: str) -> Judgement | None:
    return session.scalar(select(Judgement).where(Judgement.rater_id == rater_id, Judgement.idempotency_key == key))


def _replay(session: Session, prior: Judgement, assignment_id: int) -> JudgementRecord:
    if prior.assignment_id != assignment_id:
        raise StoreError(f"idempotency_key: already used for assignment {prior.assignment_id}", code="conflict")
    return _record(prior, session.get(Assignment, prior.assignment_id), replayed=True)


def _maybe_plant_duplicate(session: Session, rnd: Round, a: Assignment, now: dt.datetime) -> None:
    if rnd.duplicate_rate <= 0 or _unit("dup", rnd.seed, rnd.id, a.pair_id, a.rater_id) >= rnd.duplicate_rate:
        return
    pair = session.get(Pair, a.pair_id)
    other = pair.response_b_id if a.left_response_id == pair.response_a_id else pair.response_a_id
    d = Assignment(round_id=rnd.id, item_id=a.item_id, pair_id=a.pair_id, rater_id=a.rater_id,
                   left_response_id=other, is_duplicate=True, duplicate_of_id=a.id, slot=None, seq=None,
                   due_seq=a.seq + rnd.duplicate_gap + 1, state="scheduled", created_at=now)

    def add() -> None:
        session.add(d)
        session.flush()
        session.add(DuplicateLink(round_id=rnd.id, rater_id=a.rater_id, pair_id=a.pair_id,
                                  original_assignment_id=a.id, duplicate_assignment_id=d.id, created_at=now))

    _try(session, add)  # already planted (cannot happen for a first judgement): nothing to do


# ---- queries for later stages ------------------------------------------------------------


def _judgement_rows(session: Session, where: list) -> list[JudgementRow]:  # noqa: ANN001
    ra, rb = aliased(Response), aliased(Response)
    q = (select(Judgement, Assignment, Pair, Prompt, Rater, Round, ra, rb, GuidelineVersion.label)
         .join(Assignment, Assignment.id == Judgement.assignment_id)
         .join(Pair, Pair.id == Judgement.pair_id)
         .join(Prompt, Prompt.id == Pair.prompt_id)
         .join(Rater, Rater.id == Judgement.rater_id)
         .join(Round, Round.id == Judgement.round_id)
         .join(ra, ra.id == Pair.response_a_id)
         .join(rb, rb.id == Pair.response_b_id)
         .outerjoin(GuidelineVersion, GuidelineVersion.id == Judgement.guideline_version_id)
         .where(*where).order_by(Judgement.id))
    out = []
    for j, a, p, pr, r, rnd, resp_a, resp_b, label in session.execute(q):
        out.append(JudgementRow(j.id, a.id, rnd.id, rnd.kind, p.id, pr.id, pr.text, pr.topic, r.id, r.name,
                                resp_a.id, resp_b.id, resp_a.source, resp_b.source, a.left_response_id,
                                j.winner_id, _choice(j.winner_id, p), j.strength, j.rationale, j.time_on_task_s,
                                a.is_duplicate, label, j.created_at))
    return out


def round_judgements(session: Session, *, round_id: int, include_duplicates: bool = True) -> list[JudgementRow]:
    """Every judgement of a round with its pair, prompt, topic, rater and duplicate flag."""
    _round(session, round_id)
    where = [Judgement.round_id == round_id]
    if not include_duplicates:
        where.append(Assignment.is_duplicate.is_(False))
    return _judgement_rows(session, where)


def project_judgements(
    session: Session, *, project_id: int, round_kinds: Sequence[str] | None = None,
) -> list[JudgementRow]:
    """Every judgement of a project (optionally of some round kinds), oldest first."""
    where = [Round.project_id == project_id]
    if round_kinds is not None:
        where.append(Round.kind.in_(list(round_kinds)))
    return _judgement_rows(session, where)


def rater_judgements(session: Session, *, rater_id: int, round_id: int | None = None) -> list[JudgementRecord]:
    """A rater's own judgements (no model identities: safe to show to that rater)."""
    q = (select(Judgement, Assignment).join(Assignment, Assignment.id == Judgement.assignment_id)
         .where(Judgement.rater_id == rater_id).order_by(Judgement.id))
    if round_id is not None:
        q = q.where(Judgement.round_id == round_id)
    return [_record(j, a, replayed=False) for j, a in session.execute(q)]


def duplicate_pairs(
    session: Session, *, project_id: int, round_id: int | None = None,
) -> list[DuplicatePair]:
    """Each planted duplicate with both answers judged (for self-consistency)."""
    jo, jd = aliased(Judgement), aliased(Judgement)
    ao, ad = aliased(Assignment), aliased(Assignment)
    q = (select(DuplicateLink, jo, jd, ao, ad, Rater, Pair)
         .join(jo, jo.assignment_id == DuplicateLink.original_assignment_id)
         .join(jd, jd.assignment_id == DuplicateLink.duplicate_assignment_id)
         .join(ao, ao.id == DuplicateLink.original_assignment_id)
         .join(ad, ad.id == DuplicateLink.duplicate_assignment_id)
         .join(Rater, Rater.id == DuplicateLink.rater_id)
         .join(Pair, Pair.id == DuplicateLink.pair_id)
         .join(Round, Round.id == DuplicateLink.round_id)
         .where(Round.project_id == project_id).order_by(DuplicateLink.id))
    if round_id is not None:
        q = q.where(DuplicateLink.round_id == round_id)
    return [DuplicatePair(link.round_id, r.id, r.name, p.id, _choice(j1.winner_id, p), _choice(j2.winner_id, p),
                          j1.strength, j2.strength, (a2.seq or 0) - (a1.seq or 0) - 1)
            for link, j1, j2, a1, a2, r, p in session.execute(q)]


def preference_examples(
    session: Session,
    *,
    project_id: int,
    round_kinds: Sequence[str] = ("calibration", "collection", "rerate"),
    latest_guideline: bool = True,
    include_ties: bool = True,
) -> list[PreferenceExample]:
    """Training examples: the latest judgement per (pair, rater).

    With ``latest_guideline`` only judgements under the newest guideline version any
    judgement of that pair was made under count (a re-rated pair drops its old labels).
    A planted duplicate and its original count once (the later answer wins).
    """
    rows = project_judgements(session, project_id=project_id, round_kinds=round_kinds)
    order = {g.label: i for i, g in enumerate(list_guidelines(session, project_id=project_id))}

    def rank(label: str | None) -> int:
        return -1 if label is None else order.get(label, -1)

    if latest_guideline:
        newest: dict[str, int] = {}
        for r in rows:
            newest[r.pair_id] = max(newest.get(r.pair_id, -1), rank(r.guideline_label))
        rows = [r for r in rows if rank(r.guideline_label) == newest[r.pair_id]]
    latest: dict[tuple[str, int], JudgementRow] = {}
    for r in rows:  # ordered by judgement id: later overwrites earlier
        latest[(r.pair_id, r.rater_id)] = r
    texts = {}
    ids = sorted({r.response_a_id for r in latest.values()} | {r.response_b_id for r in latest.values()})
    for k in range(0, len(ids), 500):
        for resp in session.scalars(select(Response).where(Response.id.in_(ids[k:k + 500]))):
            texts[resp.id] = resp.text
    out = []
    for r in sorted(latest.values(), key=lambda r: r.judgement_id):
        if r.winner_id is None and not include_ties:
            continue
        chosen = r.winner_id or r.response_a_id
        rejected = r.response_b_id if chosen == r.response_a_id else r.response_a_id
        out.append(PreferenceExample(r.pair_id, r.prompt_text, r.topic, texts[chosen], texts[rejected], chosen,
                                     rejected, r.strength, r.rater_name, r.winner_id is None, r.guideline_label,
                                     r.round_id))
    return out


def round_progress(session: Session, *, round_id: int) -> RoundProgress:
    """Items, completed items, judgements and per-rater counts of a round (admin view)."""
    rnd = _round(session, round_id)
    n_items = session.scalar(select(func.count()).select_from(RoundItem).where(RoundItem.round_id == round_id)) or 0
    per_item = (select(Assignment.item_id, func.count().label("n")).where(
        Assignment.round_id == round_id, Assignment.state == "done", Assignment.is_duplicate.is_(False))
        .group_by(Assignment.item_id).subquery())
    complete = session.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= rnd.overlap)) or 0
    n_j = session.scalar(select(func.count()).select_from(Judgement).where(Judgement.round_id == round_id)) or 0
    stats = session.execute(
        select(Rater.id, Rater.name,
               func.sum(case((Assignment.state == "done", 1), else_=0)),
               func.sum(case((Assignment.state == "leased", 1), else_=0)),
               func.sum(case((and_(Assignment.state == "done", Assignment.is_duplicate.is_(True)), 1), else_=0)))
        .join(Assignment, Assignment.rater_id == Rater.id)
        .where(Assignment.round_id == round_id).group_by(Rater.id, Rater.name).order_by(Rater.id)).all()
    times = dict(session.execute(select(Judgement.rater_id, func.sum(Judgement.time_on_task_s))
                                 .where(Judgement.round_id == round_id).group_by(Judgement.rater_id)).all())
    raters = tuple(RaterProgress(rid, name, int(d or 0), int(le or 0), int(dd or 0), float(times.get(rid) or 0.0))
                   for rid, name, d, le, dd in stats)
    return RoundProgress(round_id, n_items, complete, n_j, raters)


# ---- alerts and events ------------------------------------------------------------------


def add_alert(
    session: Session, *, project_id: int, kind: str, message: str, rater_id: int | None = None,
    round_id: int | None = None, payload: Mapping[str, Any] | None = None,
) -> int:
    """Record an alert (rater drift, low self-consistency, hacking signal, ...)."""
    _project(session, project_id)
    al = Alert(project_id=project_id, kind=_text(kind, "alert.kind", max_len=64), rater_id=rater_id,
               round_id=round_id, message=_text(message, "alert.message", allow_empty=True),
               payload=_meta(payload, "alert.payload"))
    session.add(al)
    session.flush()
    return al.id


def list_alerts(session: Session, *, project_id: int, resolved: bool | None = None,
                kind: str | None = None) -> list[AlertInfo]:
    q = select(Alert).where(Alert.project_id == project_id).order_by(Alert.id)
    if resolved is not None:
        q = q.where(Alert.resolved.is_(resolved))
    if kind is not None:
        q = q.where(Alert.kind == kind)
    return [AlertInfo(a.id, a.project_id, a.kind, a.rater_id, a.round_id, a.message, dict(a.payload or {}),
                      a.created_at, a.resolved) for a in session.scalars(q)]


def resolve_alert(session: Session, *, alert_id: int) -> None:
    a = session.get(Alert, alert_id)
    if a is None:
        raise StoreError(f"alert {alert_id} not found", code="not_found")
    a.resolved = True


def record_event(
    session: Session, *, kind: str, subject: str = "", payload: Mapping[str, Any] | None = None,
    project_id: int | None = None,
) -> int:
    """Record a decision or lineage fact (``kind='promotion'``, ``subject='runs/ppo1/step_000500'``)."""
    if project_id is not None:
        _project(session, project_id)
    e = Event(project_id=project_id, kind=_text(kind, "event.kind", max_len=64),
              subject=_text(subject, "event.subject", max_len=255, allow_empty=True),
              payload=_meta(payload, "event.payload"))
    session.add(e)
    session.flush()
    return e.id


def list_events(
    session: Session, *, project_id: int | None = None, kind: str | None = None, subject: str | None = None,
) -> list[EventInfo]:
    """Events, oldest first, filtered by any of project, kind and subject."""
    q = select(Event).order_by(Event.id)
    if project_id is not None:
        q = q.where(Event.project_id == project_id)
    if kind is not None:
        q = q.where(Event.kind == kind)
    if subject is not None:
        q = q.where(Event.subject == subject)
    return [EventInfo(e.id, e.project_id, e.kind, e.subject, dict(e.payload or {}), e.created_at)
            for e in session.scalars(q)]

