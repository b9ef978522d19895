"""SIGKILL ``preflab serve`` in the middle of a burst of submissions; every 2xx survives the restart."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import httpx
import pytest

from tests.web.conftest import make_round


@pytest.mark.slow
def test_acknowledged_judgements_survive_sigkill(sqlite_url, start_server):
    server = start_server(sqlite_url)
    round_id, raters = make_round(server.admin(), n_pairs=40, n_raters=8, overlap=2)
    acks: list[tuple[str, str, int]] = []
    stop = threading.Event()

    def burst(token: str) -> None:
        c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        while not stop.is_set():
            try:
                r = c.get(f"/api/v1/rounds/{round_id}/next")
                if r.status_code != 200 or r.json()["task"] is None:
                    return
                key = uuid.uuid4().hex
                r = c.post(f"/api/v1/rounds/{round_id}/judgements", json={
                    "assignment_id": r.json()["task"]["assignment_id"], "choice": "left", "strength": 2,
                    "rationale": "more accurate", "time_on_task_s": 1.0, "idempotency_key": key})
                if r.status_code in (200, 201):
                    acks.append((token, key, r.json()["judgement_id"]))
            except httpx.HTTPError:
                return  # the server died under us: what it acknowledged must be on disk

    threads = [threading.Thread(target=burst, args=(tok,)) for _, tok in raters]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(acks) < 25 and time.time() < deadline:
        time.sleep(0.005)
    server.kill(signal.SIGKILL)  # mid-burst: the other threads are still submitting
    stop.set()
    for t in threads:
        t.join(timeout=30)
    n_acked = len(acks)
    assert n_acked >= 25

    server.start()  # same database, same secret
    for token, key, jid in acks:
        # a client that lost its connection asks by idempotency key whether the judgement was stored
        r = httpx.get(f"{server.url}/api/v1/me/judgements/{key}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, (key, r.text)
        assert r.json()["judgement_id"] == jid
    r = server.admin().get(f"/api/v1/rounds/{round_id}/progress")
    assert sum(p["done"] for p in r.json()) >= n_acked
