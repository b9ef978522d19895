"""GET /api/v1/rounds/{id}/agreement is computed once per state of the round's judgements
(a bounded LRU in the web process), and recomputed when a judgement arrives."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def app_and_auth(tmp_path):
    from fastapi.testclient import TestClient

    from preflab.web.app import create_app
    from preflab.web.server import bootstrap
    from preflab.web.settings import WebSettings
    from tests.web.conftest import make_round

    st = WebSettings(database_url=f"sqlite:///{tmp_path / 'store.db'}", secret_key="k" * 32)
    _, _, token = bootstrap(st)
    app = create_app(st)
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {token}"
        rid, raters = make_round(c, n_pairs=6, n_raters=2, overlap=2, name="week 1")
        yield c, rid, raters


def _judge(c, rid: int, token: str, limit: int | None = None) -> int:
    auth = {"Authorization": f"Bearer {token}"}
    n = 0
    while (limit is None or n < limit) and (task := c.get(f"/api/v1/rounds/{rid}/next", headers=auth).json()["task"]):
        r = c.post(f"/api/v1/rounds/{rid}/judgements", headers=auth, json={
            "assignment_id": task["assignment_id"], "choice": "left", "strength": 2, "rationale": "reads better",
            "idempotency_key": uuid.uuid4().hex})
        assert r.status_code == 201, r.text
        n += 1
    return n


def test_agreement_is_cached_until_a_judgement_arrives(app_and_auth, monkeypatch):
    from preflab.collect import workshop

    c, rid, raters = app_and_auth
    _judge(c, rid, raters[0][1])
    assert _judge(c, rid, raters[1][1], limit=5) == 5
    calls = []
    real = workshop.round_agreement
    monkeypatch.setattr(workshop, "round_agreement", lambda s, **kw: calls.append(kw) or real(s, **kw))
    first = c.get(f"/api/v1/rounds/{rid}/agreement").json()
    again = c.get(f"/api/v1/rounds/{rid}/agreement").json()
    assert len(calls) == 1 and again == first and first["n_items"] == 5
    mk = first["statistics"]["mean_pairwise_kappa"]  # the raters share 5 items: the pair enters the mean
    assert mk["n_pairs"] == 1 and mk["min_shared"] == 5
    page = c.get(f"/admin/rounds/{rid}/agreement")  # the admin page reads the same cache
    assert page.status_code == 200 and len(calls) == 1 and 'id="kappa-pairs"' in page.text
    assert _judge(c, rid, raters[1][1]) == 1  # a new judgement: a new key, computed again
    fresh = c.get(f"/api/v1/rounds/{rid}/agreement").json()
    assert len(calls) == 2 and fresh["n_items"] == 6


def test_the_cache_is_bounded(app_and_auth):
    c, rid, raters = app_and_auth
    _judge(c, rid, raters[0][1])
    _judge(c, rid, raters[1][1], limit=2)
    c.get(f"/api/v1/rounds/{rid}/agreement")
    _, cache = c.app.state.agreement_cache
    for k in range(40):  # other rounds' results, oldest first
        cache[(1000 + k, 1, 1)] = {}
    _judge(c, rid, raters[1][1], limit=1)
    c.get(f"/api/v1/rounds/{rid}/agreement")  # a miss: stored, the least recently used go
    assert len(cache) == 32 and next(reversed(cache))[0] == rid and (1000, 1, 1) not in cache
