"""The admin pages over real HTTP: close and reopen a round, deactivate and reactivate a rater."""

from __future__ import annotations

import re

import httpx

from tests.web.conftest import make_round
from tests.web.harness import Server


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_admin_closes_a_round_and_deactivates_a_rater(tmp_path):
    server = Server(db_url=f"sqlite:///{tmp_path / 'store.db'}", log_path=tmp_path / "serve.log").start()
    try:
        with server.admin() as api:
            rid, raters = make_round(api, n_pairs=3, n_raters=2, overlap=1, name="week 1")
        (rater_id, token), _ = raters
        rater = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        admin = httpx.Client(base_url=server.url, timeout=30)
        r = admin.post("/login", data={"name": "admin", "password": server.admin_password,
                                       "csrf_token": _csrf(admin.get("/login").text)})
        assert r.status_code == 303
        page = admin.get("/admin").text
        assert 'id="raters"' in page and "Deactivate" in page and "Close</button>" in page

        r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "closed", "csrf_token": _csrf(page)})
        assert r.status_code == 200 and "is closed" in r.text and "Reopen</button>" in r.text
        assert rater.get(f"/api/v1/rounds/{rid}/next").json()["task"] is None  # a closed round hands out nothing
        r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "open", "csrf_token": _csrf(page)})
        assert r.status_code == 200 and rater.get(f"/api/v1/rounds/{rid}/next").json()["task"] is not None
        r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "paused", "csrf_token": _csrf(page)})
        assert r.status_code == 400 and "round.status: must be one of" in r.text and "got &#39;paused&#39;" in r.text

        r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "0", "csrf_token": _csrf(page)})
        assert r.status_code == 200 and "is deactivated" in r.text and "Reactivate" in r.text
        assert rater.get("/api/v1/me").status_code == 401  # a deactivated rater is signed out everywhere
        r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "1", "csrf_token": _csrf(page)})
        assert r.status_code == 200 and rater.get("/api/v1/me").status_code == 200
        me = admin.get("/api/v1/me").json()["id"]
        r = admin.post(f"/admin/raters/{me}/active", data={"active": "0", "csrf_token": _csrf(page)})
        assert r.status_code == 409 and "you cannot deactivate yourself" in r.text
        assert admin.post("/admin/raters/99999/active", data={"active": "0", "csrf_token": _csrf(page)}).status_code == 404
        r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "yes", "csrf_token": _csrf(page)})
        assert r.status_code == 422 and "active: must be 0 or 1" in r.text
    finally:
        server.kill()
