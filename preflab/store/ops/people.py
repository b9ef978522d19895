"""Projects, raters (passwords, API tokens) and guideline versions."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from preflab.store.ops.assign import release_rater_leases
from preflab.store.ops.base import (
    StoreError,
    _guideline_info,
    _project,
    _rater,
    _rater_info,
    _text,
    hash_token,
)
from preflab.store.ops.records import (
    GuidelineInfo,
    RaterInfo,
)
from preflab.store.schema import (
    ROLES,
    GuidelineVersion,
    Project,
    Rater,
)

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


def list_projects(session: Session) -> list[str]:
    """Names of the store's projects, oldest first."""
    return list(session.scalars(select(Project.name).order_by(Project.id)))


def require_project(session: Session, *, name: str, where: str = "--project") -> int:
    """The id of the project called ``name``; a missing one is a ``not_found`` StoreError naming
    ``where`` (the flag or field the name came from)."""
    pid = project_id(session, name=name)
    if pid is None:
        names = list_projects(session)
        have = f"it has {', '.join(map(repr, names))}" if names else "it has none yet; `preflab store import` makes one"
        raise StoreError(f"{where}: no project named {name!r} in the store ({have})", code="not_found")
    return pid


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
        raise StoreError(f"rater.name: {name!r} already exists in this project", code="conflict")
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


def credentials_version(session: Session, *, rater_id: int) -> str:
    """A digest that changes whenever the rater's password or API token is replaced: the web app binds
    sessions to it, so new credentials end the sessions signed in with the old ones."""
    r = _rater(session, rater_id)
    return hashlib.sha256(f"{r.password_hash or ''}|{r.token_hash or ''}".encode()).hexdigest()


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
        if r.active and not active:
            release_rater_leases(session, rater_id=r.id)
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
    session: Session, *, project_id: int, label: str, text: str = "", rubric: Sequence[str] = (), notes: str = ""
) -> int:
    """Add guideline version ``label`` (e.g. "v2") with its rubric items; newest = latest created. A
    version after the first is a revision: a ``guideline_revision`` event records it (the previous
    label, the rubric items added, ``notes``), whichever way it was written (workshop, add-rubric,
    the admin page or the API)."""
    from preflab.store.ops.events import record_event

    _project(session, project_id)
    prev = session.scalar(select(GuidelineVersion).where(GuidelineVersion.project_id == project_id)
                          .order_by(GuidelineVersion.id.desc()).limit(1))
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
    if prev is not None:
        record_event(session, kind="guideline_revision", subject=label, project_id=project_id,
                     payload={"previous": prev.label, "guideline_id": g.id, "notes": notes,
                              "added": [x for x in rubric if x not in (prev.rubric or [])],
                              "removed": [x for x in (prev.rubric or []) if x not in rubric]})
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
