"""Shared pieces of the store ops: ``StoreError``, validation and lookup helpers."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from preflab.store.ops.records import GuidelineInfo, RaterInfo
from preflab.store.schema import (
    MAX_ID_LEN,
    MAX_TEXT_LEN,
    GuidelineVersion,
    Project,
    Rater,
    Round,
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
