"""Engines, sessions and migrations for the preference store.

``make_engine(url)`` accepts a SQLAlchemy URL (``sqlite:///runs/x/store.db``,
``postgresql+psycopg://user@host/db``) or a plain file path (taken as SQLite).

SQLite is set up for many threads in one process: WAL journal, foreign keys on,
a 30 s busy timeout, and every transaction opened with ``BEGIN IMMEDIATE`` so two
writers queue for the lock instead of failing when a read upgrades to a write (the
classic ``database is locked`` under WAL). Transactions are short, so readers queueing
behind writers costs little. A session opened with ``session_scope(engine,
readonly=True)`` uses a plain deferred ``BEGIN`` instead.

PostgreSQL needs nothing special: the invariants are unique constraints (schema.py),
and store.ops retries a clash inside a savepoint. ``transact`` retries a whole transaction
on a deadlock, a serialization failure or a lock timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from preflab.config import ConfigError

T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_READONLY = "preflab_readonly"


def normalise_url(url: str | Path) -> str:
    """A SQLAlchemy URL for ``url``; a bare path becomes ``sqlite:///<path>``.

    ``postgres://`` and ``postgresql://`` (libpq style, as hosting providers print them) name the
    psycopg 3 driver that preflab installs (SQLAlchemy 2.0 would otherwise look for psycopg2)."""
    s = str(url)
    for scheme in ("postgres://", "postgresql://"):
        if s.startswith(scheme):
            return "postgresql+psycopg://" + s[len(scheme):]
    if "://" in s:
        return s
    return f"sqlite:///{Path(s).expanduser()}"


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return repr(url)


def make_engine(url: str | Path, *, echo: bool = False, create: bool = True) -> Engine:
    """An engine for ``url`` (SQLite file/memory or PostgreSQL), configured as described above.

    ``create=False``: a SQLite file that does not exist is a ``ConfigError`` naming it (commands
    that work on an existing store: a mistyped ``--db`` would otherwise make a new, empty one)."""
    s = normalise_url(url)
    try:
        u = make_url(s)
        u.get_dialect().import_dbapi()  # an unknown database or a driver not installed: named, not a traceback
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        raise ConfigError(f"--db: cannot use {_shown(s)}: {e} (expected sqlite:///PATH or "
                          "postgresql+psycopg://USER@HOST:PORT/DATABASE)") from None
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if not memory and not create and not Path(u.database).is_file():
            raise ConfigError(f"--db: no store at {u.database} (a mistyped path? `preflab store migrate --db {url}` "
                              "creates one)")
        if not memory:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        kw: dict = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if memory:
            kw["poolclass"] = StaticPool
        engine = create_engine(s, echo=echo, **kw)
        _setup_sqlite(engine, memory=memory)
        return engine
    return create_engine(s, echo=echo, pool_pre_ping=True)


def _setup_sqlite(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process kills in WAL mode
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        if conn.get_execution_options().get(_READONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_sqlite(engine_or_session: Engine | Session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "sqlite"


def new_session(engine: Engine, *, readonly: bool = False) -> Session:
    """A session on ``engine`` (objects stay readable after commit)."""
    s = Session(engine, expire_on_commit=False)
    if readonly:
        s.connection(execution_options={_READONLY: True})
    return s


@contextmanager
def session_scope(engine: Engine, *, readonly: bool = False) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception, always close."""
    session = new_session(engine, readonly=readonly)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _retryable(e: DBAPIError) -> bool:
    orig = getattr(e, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if code in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return True
    return isinstance(e, OperationalError) and "locked" in str(e).lower()


def transact(engine: Engine, fn: Callable[[Session], T], *, attempts: int = 5) -> T:
    """Run ``fn(session)`` in one transaction, retrying on deadlocks / lock timeouts."""
    for attempt in range(attempts):
        try:
            with session_scope(engine) as s:
                return fn(s)
        except DBAPIError as e:
            if attempt + 1 >= attempts or not _retryable(e):
                raise
            time.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def alembic_config(url: str | Path):  # noqa: ANN201 - alembic imported lazily
    """An Alembic ``Config`` for ``url`` pointing at the packaged migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str | Path | Engine, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (run on every app start; idempotent).

    On PostgreSQL an advisory lock serialises concurrent upgrades (several workers
    starting at once).
    """
    from alembic import command

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            cfg = alembic_config(engine.url.render_as_string(hide_password=False))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            conn.commit()
    finally:
        if not isinstance(url, Engine):
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
