"""Engines, sessions and migrations on both backends."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from preflab.store import db, ops
from preflab.store.schema import Base, Project


def test_migrations_match_the_models(engine):
    """The Alembic head builds exactly the ORM schema (no drift between the two)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []
    head = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    assert db.current_revision(engine) == head


def test_upgrade_is_idempotent(db_url):
    db.upgrade(db_url)  # already at head: nothing happens, nothing fails
    eng = db.make_engine(db_url)
    try:
        with db.session_scope(eng) as s:
            ops.create_project(s, name="x")
    finally:
        eng.dispose()


def test_sqlite_pragmas(sqlite_url):
    eng = db.make_engine(sqlite_url)
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    eng.dispose()


def test_bare_path_means_sqlite(tmp_path):
    path = tmp_path / "sub" / "store.db"
    db.upgrade(path)
    eng = db.make_engine(path)
    assert eng.dialect.name == "sqlite" and path.exists()
    with db.session_scope(eng) as s:
        assert ops.create_project(s, name="p") == 1
    eng.dispose()


def test_foreign_keys_are_enforced(engine):
    with pytest.raises(IntegrityError), db.session_scope(engine) as s:
        s.execute(text("INSERT INTO raters (project_id, name, role, specialties, hourly_rate, active, created_at) "
                       "VALUES (999, 'ghost', 'rater', '[]', 0, true, CURRENT_TIMESTAMP)"))


def test_session_scope_rolls_back_on_error(engine):
    with pytest.raises(RuntimeError), db.session_scope(engine) as s:
        ops.create_project(s, name="doomed")
        raise RuntimeError("boom")
    with db.session_scope(engine, readonly=True) as s:
        assert s.query(Project).count() == 0


def test_transact_retries_only_retryable_errors(engine):
    calls = []

    def flaky(s):
        calls.append(1)
        if len(calls) < 3:
            from sqlalchemy.exc import OperationalError

            raise OperationalError("stmt", {}, Exception("database is locked"))
        return ops.create_project(s, name="eventually")

    assert db.transact(engine, flaky) == 1 and len(calls) == 3
    with pytest.raises(ops.StoreError):
        db.transact(engine, lambda s: ops.create_project(s, name="eventually"))
