"""Fixtures for the web acceptance tests: a real ``preflab serve`` on a temp database."""

from __future__ import annotations

import httpx
import pytest

from tests.web.harness import Server, pairs_jsonl, pg_available, pg_database


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'store.db'}"


@pytest.fixture
def pg_url():
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (set PREFLAB_TEST_PG to point elsewhere)")
    with pg_database() as url:
        yield url


@pytest.fixture
def start_server(tmp_path):
    """``start_server(db_url, workers=1) -> Server``; every server started is stopped at the end."""
    started: list[Server] = []

    def start(db_url: str, workers: int = 1) -> Server:
        s = Server(db_url=db_url, workers=workers, log_path=tmp_path / f"serve-{len(started)}.log").start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def make_round(admin: httpx.Client, *, n_pairs: int, n_raters: int, overlap: int, duplicate_rate: float = 0.0,
               min_rationale_chars: int = 5, prefix: str = "p", name: str = "r1") -> tuple[int, list[tuple[int, str]]]:
    """Import ``n_pairs`` pairs, add ``n_raters`` raters, create a round; returns (round id, [(rater id, token)])."""
    r = admin.post("/api/v1/import/pairs", content=pairs_jsonl(n_pairs, prefix=prefix),
                   headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 200, r.text
    raters = []
    for i in range(n_raters):
        r = admin.post("/api/v1/raters", json={"name": f"{name}-rater{i}", "specialties": ["pricing", "billing"]})
        assert r.status_code == 201, r.text
        raters.append((r.json()["id"], r.json()["token"]))
    pair_ids = [f"{prefix}{i}" for i in range(n_pairs)]
    r = admin.post("/api/v1/rounds", json={"name": name, "pair_ids": pair_ids, "overlap": overlap,
                                          "duplicate_rate": duplicate_rate, "min_rationale_chars": min_rationale_chars,
                                          "routing": "any"})
    assert r.status_code == 201, r.text
    return r.json()["id"], raters
