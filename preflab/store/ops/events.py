"""Alerts and events (decisions, lineage) that later stages record."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from preflab.store.ops.base import (
    StoreError,
    _meta,
    _project,
    _text,
)
from preflab.store.ops.records import (
    AlertInfo,
    EventInfo,
)
from preflab.store.schema import (
    Alert,
    Event,
)

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
