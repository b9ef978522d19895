"""20 rater clients pulling and submitting in parallel over real HTTP against ``preflab serve``.

Promises checked (the store's reliability targets, docs/web.md): no item past its overlap, no rater served a
non-duplicate item twice, every 2xx submission stored exactly once, and a resubmission with
the same idempotency key does not duplicate. SQLite with one worker; PostgreSQL with four.
"""

from __future__ import annotations

import collections
import json
import threading
import uuid

import httpx
import pytest
from sqlalchemy import select

from preflab.store import db, schema
from tests.web.conftest import make_round

N_PAIRS, N_RATERS, OVERLAP = 60, 20, 3


def rate_until_done(url: str, token: str, round_id: int, acks: list, errors: list) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        for _ in range(200):
            r = c.get(f"/api/v1/rounds/{round_id}/next")
            if r.status_code != 200:
                errors.append(("next", r.status_code, r.text))
                return
            task = r.json()["task"]
            if task is None:
                return
            body = {"assignment_id": task["assignment_id"], "choice": ("left", "right", "tie")[task["assignment_id"] % 3],
                    "strength": 1, "rationale": "left is more direct", "time_on_task_s": 3.5,
                    "idempotency_key": uuid.uuid4().hex}
            r = c.post(f"/api/v1/rounds/{round_id}/judgements", json=body)
            if r.status_code in (200, 201):
                acks.append((token, body, r.json()["judgement_id"]))
            else:
                errors.append(("submit", r.status_code, r.text))


def run_crowd(db_url: str, server) -> None:
    admin = server.admin()
    round_id, raters = make_round(admin, n_pairs=N_PAIRS, n_raters=N_RATERS, overlap=OVERLAP, duplicate_rate=0.1)
    acks: list = []
    errors: list = []
    threads = [threading.Thread(target=rate_until_done, args=(server.url, tok, round_id, acks, errors))
               for _, tok in raters]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == []

    # resubmitting acknowledged judgements with the same keys writes nothing new
    by_token = {tok: rid for rid, tok in raters}
    for token, body, jid in acks[:10]:
        r = httpx.post(f"{server.url}/api/v1/rounds/{round_id}/judgements", json=body,
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code in (200, 201) and r.json()["replayed"] is True and r.json()["judgement_id"] == jid

    engine = db.make_engine(db_url)
    try:
        with db.session_scope(engine, readonly=True) as s:
            rows = s.execute(select(schema.Judgement, schema.Assignment).join(
                schema.Assignment, schema.Judgement.assignment_id == schema.Assignment.id
            ).where(schema.Judgement.round_id == round_id)).all()
            pairs = {p.id: (p.response_a_id, p.response_b_id) for p in s.scalars(select(schema.Pair))}
    finally:
        engine.dispose()
    fresh = [(j, a) for j, a in rows if not a.is_duplicate]
    per_item = collections.Counter(j.pair_id for j, _ in fresh)
    assert len(per_item) == N_PAIRS and max(per_item.values()) == OVERLAP  # every item filled, none past overlap
    per_rater_item = collections.Counter((j.rater_id, j.pair_id) for j, _ in fresh)
    assert max(per_rater_item.values()) == 1  # never the same non-duplicate item twice
    stored = {(j.rater_id, j.idempotency_key): j.id for j, _ in rows}
    assert len(stored) == len(rows) == len(acks)  # every 2xx stored exactly once, nothing else
    for token, body, jid in acks:
        assert stored[(by_token[token], body["idempotency_key"])] == jid
    # the stored winner is the canonical response the rater saw on the chosen side
    acked = {b["assignment_id"]: b["choice"] for _, b, _ in acks}
    for j, a in rows:
        a_id, b_id = pairs[j.pair_id]
        right = b_id if a.left_response_id == a_id else a_id
        expect = {"left": a.left_response_id, "right": right, "tie": None}[acked[a.id]]
        assert j.winner_id == expect
    assert any(a.is_duplicate for _, a in rows)  # planted duplicates were served too

    # the admin downloads: every judgement with canonical ids, and TRL training lines
    lines = [json.loads(x) for x in admin.get(f"/api/v1/rounds/{round_id}/export").text.splitlines()]
    assert sorted((x["judgement_id"], x["winner_id"]) for x in lines) == sorted((j.id, j.winner_id) for j, _ in rows)
    trl = [json.loads(x) for x in admin.get("/api/v1/export/trl").text.splitlines()]
    assert trl and all(set(x) == {"prompt", "chosen", "rejected", "margin"} for x in trl)
    latest = {}
    for j, _ in sorted(rows, key=lambda r: r[0].id):  # latest answer per (rater, pair), duplicates included
        latest[(j.rater_id, j.pair_id)] = j
    assert len(trl) == sum(1 for j in latest.values() if j.winner_id is not None)  # ties left out


@pytest.mark.slow
def test_twenty_raters_sqlite_one_worker(sqlite_url, start_server):
    run_crowd(sqlite_url, start_server(sqlite_url, workers=1))


@pytest.mark.slow
@pytest.mark.postgres
def test_twenty_raters_postgres_four_workers(pg_url, start_server):
    run_crowd(pg_url, start_server(pg_url, workers=4))
