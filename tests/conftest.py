"""Shared database fixtures: every test gets its own, migrated, empty store.

- ``db_url``: parametrised over ``sqlite`` (a file in ``tmp_path``) and ``postgres`` (a fresh
  schema in database ``test`` on 127.0.0.1:5432, selected through ``search_path`` in the URL,
  so a server subprocess given the URL sees the same schema; dropped afterwards). The
  postgres case is skipped, with the reason, when the server is unreachable.
- ``sqlite_url`` / ``pg_url``: one backend only.
- ``engine``: ``make_engine(db_url)``, disposed afterwards.
- ``store``: ``engine`` plus a small seeded project (see ``seed_store``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_HOST = os.environ.get("PREFLAB_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PREFLAB_PG_PORT", "5432"))
PG_DB = os.environ.get("PREFLAB_PG_DB", "test")

_pg_state: dict[str, object] = {}


def _pg_user() -> str | None:
    """The first of postgres/root that can connect (cached); None when unreachable."""
    if "user" in _pg_state:
        return _pg_state["user"]  # type: ignore[return-value]
    user, errors = None, []
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover
        _pg_state.update(user=None, reason=f"psycopg not installed ({e})")
        return None
    for candidate in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, port=PG_PORT, user=candidate, dbname=PG_DB, connect_timeout=3):
                user = candidate
                break
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            errors.append(f"{candidate}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    _pg_state["user"] = user
    _pg_state["reason"] = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}/{PG_DB} ({'; '.join(errors)})"
    return user


def _admin_conn():
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=_pg_user(), dbname=PG_DB, autocommit=True)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    """One migrated SQLite file per session; each test copies it (fast, still migrated)."""
    from preflab.store import db

    path = tmp_path_factory.mktemp("store_template") / "template.db"
    db.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(tmp_path, _sqlite_template) -> str:
    path = tmp_path / "store.db"
    shutil.copyfile(_sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def pg_url():
    """A fresh migrated schema in the ``test`` database; dropped after the test."""
    user = _pg_user()
    if user is None:
        pytest.skip(str(_pg_state["reason"]))
    from preflab.store import db

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    url = f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DB}?options=-csearch_path%3D{schema}"
    try:
        db.upgrade(url)
        yield url
    finally:
        with _admin_conn() as c:
            # a server the test left running may still hold locks: do not hang on it
            c.execute("SET lock_timeout = '10s'")
            try:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except Exception as e:  # noqa: BLE001
                import warnings

                warnings.warn(f"could not drop test schema {schema}: {e}", stacklevel=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """A migrated empty store on each backend in turn."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(name)


@pytest.fixture
def engine(db_url):
    from preflab.store import db

    eng = db.make_engine(db_url)
    yield eng
    eng.dispose()


@dataclass
class SeededStore:
    """A small project: raters with specialties, a guideline, prompts, responses and pairs."""

    engine: object
    project_id: int
    guideline_id: int
    raters: dict[str, int] = field(default_factory=dict)  # name -> id
    pair_ids: list[str] = field(default_factory=list)
    topics: dict[str, str] = field(default_factory=dict)  # pair id -> topic


def seed_store(engine, *, n_pairs: int = 12, raters: dict[str, list[str]] | None = None,
               topics: tuple[str, ...] = ("pricing", "billing"), project: str = "proj",
               passwords: bool = False) -> SeededStore:
    """Create project ``project`` with guideline v1, ``raters`` (name -> specialties; with
    ``passwords`` each gets password "pw-<name>": argon2 costs ~50 ms a rater) and ``n_pairs`` pairs ``p000..`` cycling through ``topics`` (responses
    ``r000a``/``r000b`` from sources ``model-a``/``model-b``)."""
    from preflab.store import db, ops

    raters = raters if raters is not None else {"ann": ["pricing"], "bob": ["billing"], "cat": []}
    with db.session_scope(engine) as s:
        pid = ops.create_project(s, name=project)
        gid = ops.create_guideline_version(s, project_id=pid, label="v1", text="Prefer correct answers.",
                                           rubric=["accuracy", "tone"])
        rids = {name: ops.create_rater(s, project_id=pid, name=name, specialties=specs,
                                        password=f"pw-{name}" if passwords else None)
                for name, specs in raters.items()}
        prompts, responses, pairs, tmap = [], [], [], {}
        for i in range(n_pairs):
            topic = topics[i % len(topics)]
            q = f"q{i:03d}"
            prompts.append({"id": q, "text": f"Question {i} about {topic}?", "topic": topic})
            for side in "ab":
                responses.append({"id": f"r{i:03d}{side}", "prompt_id": q, "text": f"Answer {side} to question {i}.",
                                  "source": f"model-{side}"})
            pairs.append({"id": f"p{i:03d}", "prompt_id": q, "response_a_id": f"r{i:03d}a",
                          "response_b_id": f"r{i:03d}b"})
            tmap[f"p{i:03d}"] = topic
        ops.add_prompts(s, project_id=pid, prompts=prompts)
        ops.add_responses(s, project_id=pid, responses=responses)
        ops.add_pairs(s, project_id=pid, pairs=pairs)
    return SeededStore(engine, pid, gid, rids, [p["id"] for p in pairs], tmap)


@pytest.fixture
def store(engine) -> SeededStore:
    """``engine`` with ``seed_store``'s default small project."""
    return seed_store(engine)


@pytest.fixture
def seed(engine):
    """A factory: ``seed(n_pairs=..., raters={...}, topics=(...))`` -> ``SeededStore`` on ``engine``."""

    def make(**kw) -> SeededStore:
        return seed_store(engine, **kw)

    return make


def judge_all(engine, round_id: int, rater_id: int, pick, *, seconds: float = 10.0) -> int:
    """The rater answers every task of a round; ``pick(task)`` -> a canonical response id or
    "left" / "right". Returns how many judgements were stored."""
    from preflab.store import db, ops

    n = 0
    while True:
        with db.session_scope(engine) as s:
            t = ops.next_task(s, round_id=round_id, rater_id=rater_id)
            if t is None:
                return n
            ops.submit_judgement(s, assignment_id=t.assignment_id, rater_id=rater_id, choice=pick(t), strength=2,
                                 rationale="checked the facts", time_on_task_s=seconds,
                                 idempotency_key=f"key-{round_id}-{t.assignment_id}")
            n += 1
