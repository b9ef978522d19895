"""Alembic environment for the preference store (run through ``preflab.store.db.upgrade``).

Uses the connection passed in ``config.attributes['connection']`` when there is one,
else the URL of the config. On PostgreSQL a transaction-level advisory lock serialises
concurrent upgrades (several workers starting at once).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from preflab.store.db import make_engine
from preflab.store.schema import Base

target_metadata = Base.metadata
_LOCK_KEY = 0x70726566  # "pref"


def _run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    conn = context.config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
