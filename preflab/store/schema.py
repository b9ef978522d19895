"""The preference store's tables (SQLAlchemy 2 typed ORM).

One project holds raters, guideline versions, prompts, responses and comparison pairs.
A round puts pairs in front of raters under one guideline version; an assignment is one
pair shown to one rater (sides randomised); a judgement is that rater's answer, stored
against the *canonical* response ids, never the screen side.

Concurrency invariants live in unique constraints so they hold across threads and
processes on SQLite and PostgreSQL alike (store.ops retries on a clash):

- ``uq_assignment_slot``: an item has at most ``overlap`` non-duplicate assignments
  (slots ``0..overlap-1``; planted duplicates carry no slot);
- ``uq_assignment_rater_item``: a rater holds an item at most once as a fresh task and
  at most once as a planted duplicate;
- ``uq_assignment_seq``: a rater's task order within a round is a sequence;
- ``uq_assignment_one_lease``: a rater holds at most one leased task per round;
- ``uq_judgement_idem``: a client idempotency key names one judgement per rater;
- ``uq_judgement_assignment``: an assignment is judged once.

Times are naive UTC datetimes (SQLite keeps no time zone).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("rater", "admin")
ROUND_KINDS = ("calibration", "collection", "rerate", "eval")
ROUND_STATUSES = ("open", "closed")
ROUTINGS = ("specialty", "any")
FALLBACKS = ("always", "after", "never")
ASSIGNMENT_STATES = ("scheduled", "leased", "done")
MAX_ID_LEN = 128
MAX_TEXT_LEN = 20_000

# Stable constraint names so Alembic migrations can address them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """The current time as a naive UTC datetime (the store's time convention)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Rater(Base):
    __tablename__ = "raters"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_rater_name"),
        CheckConstraint("role in ('rater', 'admin')", name="role"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16), default="rater")
    specialties: Mapped[list[Any]] = mapped_column(JSON, default=list)
    hourly_rate: Mapped[float] = mapped_column(Float, default=0.0)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # sha256 of a random API token: high-entropy secrets need no slow hash and must be looked up
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class GuidelineVersion(Base):
    __tablename__ = "guideline_versions"
    __table_args__ = (UniqueConstraint("project_id", "label", name="uq_guideline_label"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text, default="")
    rubric: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[str] = mapped_column(String(MAX_ID_LEN), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    topic: Mapped[str] = mapped_column(String(64), default="")
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Response(Base):
    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(String(MAX_ID_LEN), primary_key=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), default="")  # model / checkpoint label; never shown to raters
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Pair(Base):
    __tablename__ = "pairs"
    __table_args__ = (CheckConstraint("response_a_id <> response_b_id", name="distinct_sides"),)
    id: Mapped[str] = mapped_column(String(MAX_ID_LEN), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    response_a_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    response_b_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    prompt: Mapped[Prompt] = relationship(foreign_keys=[prompt_id])
    response_a: Mapped[Response] = relationship(foreign_keys=[response_a_id])
    response_b: Mapped[Response] = relationship(foreign_keys=[response_b_id])


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_round_name"),
        CheckConstraint("kind in ('calibration', 'collection', 'rerate', 'eval')", name="kind"),
        CheckConstraint("status in ('open', 'closed')", name="status"),
        CheckConstraint("overlap >= 1", name="overlap"),
        CheckConstraint("duplicate_rate >= 0 and duplicate_rate <= 1", name="duplicate_rate"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    guideline_version_id: Mapped[int | None] = mapped_column(ForeignKey("guideline_versions.id"))
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    duplicate_rate: Mapped[float] = mapped_column(Float, default=0.1)
    duplicate_gap: Mapped[int] = mapped_column(Integer, default=5)
    allow_ties: Mapped[bool] = mapped_column(Boolean, default=True)
    min_rationale_chars: Mapped[int] = mapped_column(Integer, default=10)
    routing: Mapped[str] = mapped_column(String(16), default="specialty")
    fallback: Mapped[str] = mapped_column(String(16), default="always")
    fallback_after_s: Mapped[float] = mapped_column(Float, default=0.0)
    lease_s: Mapped[float] = mapped_column(Float, default=900.0)
    status: Mapped[str] = mapped_column(String(16), default="open")
    seed: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    guideline: Mapped[GuidelineVersion | None] = relationship()


class RoundItem(Base):
    __tablename__ = "round_items"
    __table_args__ = (
        UniqueConstraint("round_id", "pair_id", name="uq_round_item_pair"),
        # next_task picks (round, [domain,] filled desc, position desc) by a backward index scan
        Index("ix_round_item_pick", "round_id", "filled", "position"),
        Index("ix_round_item_pick_domain", "round_id", "domain", "filled", "position"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"), index=True)
    domain: Mapped[str] = mapped_column(String(64), default="")
    position: Mapped[int] = mapped_column(Integer, default=0)
    # slotted (fresh) assignments of this item; the unique slots are the invariant, this the fast path
    filled: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "slot", name="uq_assignment_slot"),
        UniqueConstraint("item_id", "rater_id", "is_duplicate", name="uq_assignment_rater_item"),
        UniqueConstraint("round_id", "rater_id", "seq", name="uq_assignment_seq"),
        CheckConstraint("state in ('scheduled', 'leased', 'done')", name="state"),
        Index("ix_assignment_round_rater_state", "round_id", "rater_id", "state"),
        # a rater holds at most one leased task per round (two requests at once get the same one)
        Index("uq_assignment_one_lease", "round_id", "rater_id", unique=True,
              sqlite_where=text("state = 'leased'"), postgresql_where=text("state = 'leased'")),
        Index("ix_assignment_round_state_lease", "round_id", "state", "lease_expires_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("round_items.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    left_response_id: Mapped[str] = mapped_column(ForeignKey("responses.id"))
    is_duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    slot: Mapped[int | None] = mapped_column(Integer)  # 0..overlap-1 for fresh tasks, NULL for duplicates
    seq: Mapped[int | None] = mapped_column(Integer)  # order of serving to this rater; NULL while scheduled
    due_seq: Mapped[int | None] = mapped_column(Integer)  # a scheduled duplicate is served at seq >= due_seq
    state: Mapped[str] = mapped_column(String(16), default="leased")
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    leased_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    done_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Judgement(Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("rater_id", "idempotency_key", name="uq_judgement_idem"),
        UniqueConstraint("assignment_id", name="uq_judgement_assignment"),
        CheckConstraint("strength >= 0 and strength <= 3", name="strength"),
        Index("ix_judgement_round", "round_id"),
        Index("ix_judgement_pair", "pair_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    winner_id: Mapped[str | None] = mapped_column(ForeignKey("responses.id"))  # NULL = tie
    strength: Mapped[int] = mapped_column(Integer, default=1)
    rationale: Mapped[str] = mapped_column(Text, default="")
    time_on_task_s: Mapped[float] = mapped_column(Float, default=0.0)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    guideline_version_id: Mapped[int | None] = mapped_column(ForeignKey("guideline_versions.id"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DuplicateLink(Base):
    """A planted duplicate: the same rater sees ``pair_id`` again with the sides swapped."""

    __tablename__ = "duplicate_links"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"))
    pair_id: Mapped[str] = mapped_column(ForeignKey("pairs.id", ondelete="CASCADE"))
    original_assignment_id: Mapped[int] = mapped_column(
        ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    duplicate_assignment_id: Mapped[int] = mapped_column(
        ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Alert(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    rater_id: Mapped[int | None] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    message: Mapped[str] = mapped_column(Text, default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    resolved: Mapped[bool] = mapped_column(Boolean, default=False)


class Event(Base):
    """Promotion decisions, lineage and other facts later stages record (kind, subject, payload)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_event_kind_subject", "project_id", "kind", "subject"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255), default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
