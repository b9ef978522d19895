"""Security promises over real HTTP against ``preflab serve`` (one server for the module).

Roles, blindness (no model identity, no other rater's answers), hashed secrets, cookie flags,
CSRF on form posts and cookie-authenticated API calls, and clear 4xx on bad input.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from preflab.store import db, schema
from tests.web.conftest import make_round
from tests.web.harness import Server

SOURCES = ("sft", "ppo-step500")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    url = f"sqlite:///{tmp / 'store.db'}"
    server = Server(db_url=url, log_path=tmp / "serve.log").start()
    try:
        admin = server.admin()
        round_id, raters = make_round(admin, n_pairs=6, n_raters=2, overlap=2, name="sec")
        r = admin.post("/api/v1/raters", json={"name": "alice", "password": "alice-password-1"})
        assert r.status_code == 201
        yield {"server": server, "url": url, "db": tmp / "store.db", "round": round_id, "raters": raters,
               "alice": r.json()}
    finally:
        server.kill()


def bearer(world, i: int) -> httpx.Client:
    return httpx.Client(base_url=world["server"].url, timeout=30,
                        headers={"Authorization": f"Bearer {world['raters'][i][1]}"})


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html) or re.search(r'data-csrf="([^"]+)"', html)
    assert m, "no CSRF token in page"
    return m.group(1)


def sign_in(world, name: str, password: str) -> httpx.Client:
    c = httpx.Client(base_url=world["server"].url, timeout=30)
    token = csrf_of(c.get("/login").text)
    r = c.post("/login", data={"name": name, "password": password, "csrf_token": token})
    assert r.status_code == 303, r.text
    return c


def test_rater_gets_403_on_admin_routes(world):
    rid = world["round"]
    c = bearer(world, 0)
    for method, path, kw in [
        ("GET", "/api/v1/admin/rounds", {}), ("POST", "/api/v1/rounds", {"json": {"name": "x"}}),
        ("GET", f"/api/v1/rounds/{rid}/progress", {}), ("GET", f"/api/v1/rounds/{rid}/export", {}),
        ("GET", "/api/v1/export/trl", {}), ("GET", "/api/v1/alerts", {}),
        ("POST", "/api/v1/raters", {"json": {"name": "mallory"}}),
        ("POST", "/api/v1/import/pairs", {"content": b"{}"}),
    ]:
        r = c.request(method, path, **kw)
        assert r.status_code == 403, (method, path, r.status_code)
        assert r.json()["error"]["code"] == "forbidden"
    pages = sign_in(world, "alice", "alice-password-1")
    for path in ("/admin", f"/admin/rounds/{rid}"):
        r = pages.get(path)
        assert r.status_code == 403 and "admin role" in r.text
    html = pages.get("/rate").text
    r = pages.post("/admin/raters", data={"name": "mallory", "csrf_token": csrf_of(html)})
    assert r.status_code == 403


def test_no_model_identity_or_canonical_ids_reach_raters(world):
    rid = world["round"]
    c = bearer(world, 0)
    task = c.get(f"/api/v1/rounds/{rid}/next")
    assert task.status_code == 200
    pages = sign_in(world, "alice", "alice-password-1")
    bodies = [task.text, c.get("/api/v1/rounds").text, c.get("/api/v1/me").text,
              pages.get(f"/rate/{rid}").text, pages.get("/rate").text, c.get("/api/v1/openapi.json").text]
    for body in bodies:
        for leak in SOURCES + ("source", "response_id", "left_id", "winner_id"):
            assert leak not in body, leak
        assert not re.search(r'"p\d+[ab]"', body)  # canonical response ids like "p3a"


def test_rater_cannot_read_or_answer_for_another_rater(world):
    rid = world["round"]
    a, b = bearer(world, 0), bearer(world, 1)
    task = a.get(f"/api/v1/rounds/{rid}/next").json()["task"]
    key = uuid.uuid4().hex
    body = {"assignment_id": task["assignment_id"], "choice": "left", "strength": 1,
            "rationale": "clearer and correct", "idempotency_key": key}
    # b cannot submit on a's assignment
    r = b.post(f"/api/v1/rounds/{rid}/judgements", json=dict(body, idempotency_key=uuid.uuid4().hex))
    assert r.status_code == 404
    assert a.post(f"/api/v1/rounds/{rid}/judgements", json=body).status_code == 201
    assert a.get(f"/api/v1/me/judgements/{key}").status_code == 200
    r = b.get(f"/api/v1/me/judgements/{key}")  # another rater's judgement is invisible
    assert r.status_code == 404 and "no judgement of yours" in r.json()["error"]["message"]


def test_secrets_are_stored_hashed(world):
    engine = db.make_engine(world["url"])
    with db.session_scope(engine, readonly=True) as s:
        alice = s.scalar(select(schema.Rater).where(schema.Rater.name == "alice"))
        tokens = {r.id: r.token_hash for r in s.scalars(select(schema.Rater))}
    engine.dispose()
    assert alice.password_hash.startswith("$argon2id$") and "alice-password-1" not in alice.password_hash
    assert alice.token_hash == hashlib.sha256(world["alice"]["token"].encode()).hexdigest()
    for rid, token in world["raters"]:
        assert tokens[rid] == hashlib.sha256(token.encode()).hexdigest()
    raw = b"".join(p.read_bytes() for p in Path(world["db"]).parent.glob("store.db*"))
    for secret in ["alice-password-1", world["alice"]["token"], world["server"].admin_password,
                   world["server"].admin_token] + [t for _, t in world["raters"]]:
        assert secret.encode() not in raw


def test_session_cookie_flags_and_tampering(world):
    c = httpx.Client(base_url=world["server"].url, timeout=30)
    r = c.get("/login")
    token = csrf_of(r.text)
    r = c.post("/login", data={"name": "alice", "password": "alice-password-1", "csrf_token": token})
    cookie = r.headers["set-cookie"].lower()
    page = c.get("/rate")
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/" in cookie
    assert c.get("/api/v1/me").json()["name"] == "alice"
    forged = c.cookies.get("preflab_session")[:-2] + "AA"
    r = httpx.get(world["server"].url + "/api/v1/me", cookies={"preflab_session": forged})
    assert r.status_code == 401
    r = c.post("/login", data={"name": "alice", "password": "wrong", "csrf_token": csrf_of(c.get("/login").text)})
    assert r.status_code == 401 and "wrong password" in r.text
    assert 'value="alice"' in r.text and "wrong" not in r.text.split("wrong password")[1]  # the name stays, not the password


def test_csrf_required_on_form_posts_and_cookie_api_calls(world):
    c = httpx.Client(base_url=world["server"].url, timeout=30)
    c.get("/login")
    r = c.post("/login", data={"name": "alice", "password": "alice-password-1"})
    assert r.status_code == 403 and "csrf_token" in r.text
    r = c.post("/login", data={"name": "alice", "password": "alice-password-1", "csrf_token": "forged"})
    assert r.status_code == 403
    admin = sign_in(world, "admin", world["server"].admin_password)
    html = admin.get("/admin").text
    assert admin.post("/admin/raters", data={"name": "eve"}).status_code == 403
    assert admin.post("/admin/raters", data={"name": "eve", "csrf_token": csrf_of(html)}).status_code == 303
    # the JSON API with the session cookie needs the header too
    r = admin.post("/api/v1/raters", json={"name": "eve2"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "csrf"
    r = admin.post("/api/v1/raters", json={"name": "eve2"}, headers={"X-CSRF-Token": csrf_of(html)})
    assert r.status_code == 201
    # no session at all (never signed in, or expired): 401 as for a GET, not a CSRF complaint
    r = httpx.post(world["server"].url + f"/api/v1/rounds/{world['round']}/judgements", json={}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_bad_input_gets_clear_4xx(world):
    rid = world["round"]
    c = bearer(world, 1)
    task = c.get(f"/api/v1/rounds/{rid}/next").json()["task"]
    ok = {"assignment_id": task["assignment_id"], "choice": "left", "strength": 1,
          "rationale": "clearer and correct", "idempotency_key": uuid.uuid4().hex}
    cases = [
        (dict(ok, rationale="x" * 5000), 422, "rationale"),
        (dict(ok, rationale="no"), 400, "rationale: at least"),
        (dict(ok, choice="both"), 422, "choice"),
        (dict(ok, strength="much"), 422, "strength"),
        (dict(ok, idempotency_key="bad key!"), 422, "idempotency_key"),
        (dict(ok, assignment_id=999999), 404, "assignment 999999"),
        (dict(ok, extra=1), 422, "extra"),
        (dict(ok, time_on_task_s="NaN"), 422, "time_on_task_s: Input should be a finite number"),
    ]
    for body, status, needle in cases:
        r = c.post(f"/api/v1/rounds/{rid}/judgements", json=body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["error"]["message"], r.text
    r = c.post(f"/api/v1/rounds/{rid}/judgements", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    assert r.json()["error"]["message"].startswith("body: invalid JSON at character 1 (Expecting property name")
    r = c.post(f"/api/v1/rounds/{rid}/judgements", content=b'{"choice": "left"}')  # no Content-Type
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    admin = world["server"].admin()
    big = b"x" * (8 * 1024 * 1024 + 10)
    r = admin.post("/api/v1/import/pairs", content=big)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    bad = (b'{"id": "z1", "prompt": {"id": "zq", "text": "q"}, "response_a": {"id": "za", "text": "a"}, '
           b'"response_b": {"id": "zb", "text": "b"}}\n{oops\n')
    r = admin.post("/api/v1/import/pairs", content=bad)
    assert r.status_code == 400 and "pairs.jsonl:2" in r.json()["error"]["message"]
    assert admin.post("/api/v1/rounds", json={"name": "z", "pair_ids": ["z1"]}).status_code == 404  # nothing imported
    r = admin.post("/api/v1/import/prompts", content=b'{"id": "zz", "txt": "typo"}\n')
    assert r.status_code == 400 and "prompts.jsonl:1" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_input"  # the same code as a malformed request's 422
    assert admin.post("/api/v1/import/csv", content=b"a,b").status_code == 422
    r = httpx.get(world["server"].url + "/api/v1/me")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    r = httpx.get(world["server"].url + "/api/v1/me", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
