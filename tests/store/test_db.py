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


def test_downgrade_to_base_and_back(db_url):
    from alembic import command

    eng = db.make_engine(db_url)
    try:
        with eng.connect() as conn:
            cfg = db.alembic_config(db_url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
            conn.commit()
        assert db.current_revision(eng) is None
        db.upgrade(eng)
        with db.session_scope(eng) as s:
            assert ops.create_project(s, name="back") >= 1
    finally:
        eng.dispose()


def test_0003_backfills_filled_from_existing_assignments(tmp_path):
    """A store with live assignments at 0002 gets the right ``filled`` counts at head."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0002")
    eng = db.make_engine(url)
    stmts = [
        "INSERT INTO projects (id, name, created_at) VALUES (1, 'p', CURRENT_TIMESTAMP)",
        "INSERT INTO raters (id, project_id, name, role, specialties, hourly_rate, active, created_at) "
        "VALUES (1, 1, 'a', 'rater', '[]', 0, 1, CURRENT_TIMESTAMP), (2, 1, 'b', 'rater', '[]', 0, 1, CURRENT_TIMESTAMP)",
        "INSERT INTO prompts (id, project_id, text, topic, meta, created_at) VALUES ('q', 1, 't', '', '{}', CURRENT_TIMESTAMP)",
        "INSERT INTO responses (id, prompt_id, text, source, meta, created_at) VALUES "
        "('ra', 'q', 'x', '', '{}', CURRENT_TIMESTAMP), ('rb', 'q', 'y', '', '{}', CURRENT_TIMESTAMP)",
        "INSERT INTO pairs (id, project_id, prompt_id, response_a_id, response_b_id, meta, created_at) "
        "VALUES ('p', 1, 'q', 'ra', 'rb', '{}', CURRENT_TIMESTAMP)",
        "INSERT INTO rounds (id, project_id, name, kind, overlap, duplicate_rate, duplicate_gap, allow_ties, "
        "min_rationale_chars, routing, fallback, fallback_after_s, lease_s, status, seed, meta, created_at) "
        "VALUES (1, 1, 'r', 'collection', 3, 0, 5, 1, 0, 'any', 'always', 0, 900, 'open', 0, '{}', CURRENT_TIMESTAMP)",
        "INSERT INTO round_items (id, round_id, pair_id, domain, position) VALUES (1, 1, 'p', '', 0)",
        "INSERT INTO assignments (round_id, item_id, pair_id, rater_id, left_response_id, is_duplicate, slot, seq, "
        "state, created_at) VALUES (1, 1, 'p', 1, 'ra', 0, 0, 0, 'leased', CURRENT_TIMESTAMP), "
        "(1, 1, 'p', 2, 'rb', 0, 1, 0, 'leased', CURRENT_TIMESTAMP)",
    ]
    with eng.begin() as conn:
        for st in stmts:
            conn.execute(text(st))
    db.upgrade(eng)
    with eng.connect() as conn:
        assert conn.execute(text("SELECT filled FROM round_items WHERE id = 1")).scalar() == 2
    eng.dispose()
