"""The admin pages and the admin API over real HTTP: rounds (close, reopen), raters (edit, new
credentials, deactivate), guideline versions, post/redirect/get, and the error page's navigation."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.web.conftest import make_round
from tests.web.harness import Server


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def _signed_in(server: Server) -> tuple[httpx.Client, str]:
    admin = httpx.Client(base_url=server.url, timeout=30)
    r = admin.post("/login", data={"name": "admin", "password": server.admin_password,
                                   "csrf_token": _csrf(admin.get("/login").text)})
    assert r.status_code == 303
    return admin, _csrf(admin.get("/admin").text)


@pytest.fixture
def served(tmp_path):
    server = Server(db_url=f"sqlite:///{tmp_path / 'store.db'}", log_path=tmp_path / "serve.log").start()
    try:
        with server.admin() as api:
            rid, raters = make_round(api, n_pairs=3, n_raters=2, overlap=1, name="week 1")
        yield server, rid, raters
    finally:
        server.kill()


def test_admin_closes_a_round_and_deactivates_a_rater(served):
    server, rid, raters = served
    (rater_id, token), _ = raters
    rater = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    admin, csrf = _signed_in(server)
    page = admin.get("/admin").text
    assert 'id="raters"' in page and "Deactivate" in page and "Close</button>" in page
    for leftover in ("/admin/raters", "/admin/guidelines", f"/admin/raters/{rater_id}/credentials",
                     f"/admin/rounds/{rid}/status", "/admin/import"):  # a form's address from the history
        r = admin.get(leftover)
        assert r.status_code == 303 and r.headers["location"] == "/admin", leftover
    # the round's own page says whether it is open and closes it, coming back to itself
    r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "closed", "back": "round", "csrf_token": csrf},
                   follow_redirects=True)
    assert str(r.url).endswith(f"/admin/rounds/{rid}") and "This round is <strong>closed</strong>" in r.text
    assert "Round “week 1” is closed." in r.text and "Reopen the round" in r.text
    admin.post(f"/admin/rounds/{rid}/status", data={"status": "open", "back": "round", "csrf_token": csrf})

    # post/redirect/get: the post answers 303 to the dashboard, which says what happened once
    r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "closed", "csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    page = admin.get("/admin").text
    assert "Round “week 1” is closed." in page and "Reopen</button>" in page
    assert "is closed." not in admin.get("/admin").text  # a reload shows the page, not the message again
    assert rater.get(f"/api/v1/rounds/{rid}/next").json()["task"] is None  # a closed round hands out nothing
    r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "open", "csrf_token": csrf}, follow_redirects=True)
    assert r.status_code == 200 and "is open." in r.text
    assert rater.get(f"/api/v1/rounds/{rid}/next").json()["task"] is not None
    r = admin.post(f"/admin/rounds/{rid}/status", data={"status": "paused", "csrf_token": csrf})
    assert r.status_code == 400 and "round.status: must be one of" in r.text and "got &#39;paused&#39;" in r.text

    r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "0", "csrf_token": csrf}, follow_redirects=True)
    assert r.status_code == 200 and "is deactivated." in r.text and "Reactivate" in r.text
    assert rater.get("/api/v1/me").status_code == 401  # a deactivated rater is signed out everywhere
    r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "1", "csrf_token": csrf}, follow_redirects=True)
    assert r.status_code == 200 and rater.get("/api/v1/me").status_code == 200
    me = admin.get("/api/v1/me").json()["id"]
    r = admin.post(f"/admin/raters/{me}/active", data={"active": "0", "csrf_token": csrf})
    assert r.status_code == 409 and "you cannot deactivate or demote yourself" in r.text
    assert admin.post("/admin/raters/99999/active", data={"active": "0", "csrf_token": csrf}).status_code == 404
    r = admin.post(f"/admin/raters/{rater_id}/active", data={"active": "yes", "csrf_token": csrf})
    assert r.status_code == 422 and "active: must be 0 or 1" in r.text


def test_admin_edits_a_rater_and_gives_new_credentials(served):
    server, _, raters = served
    (rater_id, token), _ = raters
    admin, csrf = _signed_in(server)
    r = admin.post(f"/admin/raters/{rater_id}", data={"specialties": "pricing,  refunds ,", "hourly_rate": "31.5",
                                                      "role": "rater", "csrf_token": csrf}, follow_redirects=True)
    assert r.status_code == 200 and "specialties pricing, refunds, 31.5 per hour" in r.text
    api = server.admin()
    row = next(x for x in api.get("/api/v1/raters").json() if x["id"] == rater_id)
    assert row["specialties"] == ["pricing", "refunds"] and row["hourly_rate"] == 31.5 and row["active"]
    r = admin.post(f"/admin/raters/{rater_id}", data={"hourly_rate": "-1", "role": "rater", "csrf_token": csrf})
    assert r.status_code == 422 and "hourly_rate" in r.text
    r = admin.post(f"/admin/raters/{rater_id}", data={"hourly_rate": "", "role": "rater", "csrf_token": csrf})
    assert r.status_code == 422 and "hourly_rate: enter a number" in r.text  # not a silent 0
    assert next(x for x in api.get("/api/v1/raters").json() if x["id"] == rater_id)["hourly_rate"] == 31.5
    r = admin.post(f"/admin/raters/{rater_id}", data={"specialties": "Billing, billing , ,shipping", "hourly_rate": "31.5",
                                                      "role": "rater", "csrf_token": csrf}, follow_redirects=True)
    assert "specialties Billing, shipping" in r.text  # each once
    assert "Note: no prompt has the topic &#39;Billing&#39;, &#39;shipping&#39;" in r.text  # the pairs' topics differ
    r = admin.post("/admin/raters", data={"name": "  dave  ", "hourly_rate": "20", "csrf_token": csrf},
                   follow_redirects=True)
    assert "Rater “dave” created" in r.text  # trimmed: the name a rater types at the sign-in

    # new credentials: shown once on the response; the old token and password stop working at once
    old = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert old.get("/api/v1/me").status_code == 200
    r = admin.post(f"/admin/raters/{rater_id}/credentials", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/admin"  # a reload cannot reset them again
    r = admin.get("/admin")
    assert "given new credentials" in r.text
    password = re.search(r'password <code class="secret">([^<]+)</code>', r.text).group(1)
    new_token = re.search(r'API token <code class="secret">([^<]+)</code>', r.text).group(1)
    assert password not in str(admin.cookies.jar)  # the cookie that carried it is encrypted, and now gone
    assert old.get("/api/v1/me").status_code == 401
    new = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {new_token}"}, timeout=30)
    assert new.get("/api/v1/me").json()["id"] == rater_id
    signed = httpx.Client(base_url=server.url, timeout=30)
    r = signed.post("/login", data={"name": "week 1-rater0", "password": password,
                                    "csrf_token": _csrf(signed.get("/login").text)})
    assert r.status_code == 303 and signed.get("/api/v1/me").json()["id"] == rater_id
    assert "given new credentials" not in admin.get("/admin").text  # never shown again
    # deactivated: the right password learns why it cannot sign in; a wrong one learns nothing
    admin.post(f"/admin/raters/{rater_id}/active", data={"active": "0", "csrf_token": csrf})
    for pw, words in ((password, "This account is deactivated"), ("guess-guess", "Unknown name or wrong password")):
        browser = httpx.Client(base_url=server.url, timeout=30)
        r = browser.post("/login", data={"name": "week 1-rater0", "password": pw,
                                         "csrf_token": _csrf(browser.get("/login").text)})
        assert r.status_code == 401 and words in r.text
    admin.post(f"/admin/raters/{rater_id}/active", data={"active": "1", "csrf_token": csrf})

    # the API: a chosen password, a rater of no project, demoting oneself
    r = api.post(f"/api/v1/raters/{rater_id}/credentials", json={"password": "correct horse battery"})
    assert r.status_code == 200 and r.json()["password"] == "correct horse battery"
    r = signed.get("/api/v1/me")  # the session signed in with the old password ends with it
    assert r.status_code == 401 and "new credentials" in r.json()["error"]["message"]
    assert signed.get("/rate", follow_redirects=False).status_code in (303, 401)
    assert api.post("/api/v1/raters/424242/credentials").status_code == 404
    me = api.get("/api/v1/me").json()["id"]
    r = api.patch(f"/api/v1/raters/{me}", json={"role": "rater"})
    assert r.status_code == 409 and "demote yourself" in r.json()["error"]["message"]
    r = api.patch(f"/api/v1/raters/{rater_id}", json={"specialties": ["pricing", " "]})
    assert r.status_code == 422 and "specialties: an empty domain name" in r.json()["error"]["message"]

    # an admin renewing their own credentials on the page stays signed in there; the old token stops
    r = admin.post(f"/admin/raters/{me}/credentials", data={"csrf_token": csrf}, follow_redirects=True)
    assert r.status_code == 200 and "given new credentials" in r.text
    assert admin.get("/api/v1/me").json()["id"] == me
    assert api.get("/api/v1/me").status_code == 401


def test_admin_writes_guideline_versions(served):
    server, _, _ = served
    admin, csrf = _signed_in(server)
    page = admin.get("/admin").text
    assert "No guideline yet" in page and 'name="label" required maxlength="64" value="v1"' in page
    r = admin.post("/admin/guidelines", data={
        "label": "v1", "text": "Answer the question asked.\r\nQuote prices from the price list.",
        "rubric": "Answers the question asked\r\n\r\n  Quotes the current price list  \r\n", "csrf_token": csrf})
    assert r.status_code == 303
    page = admin.get("/admin").text
    assert "Guideline v1 saved with 2 rubric items" in page
    assert "<li>Quotes the current price list</li>" in page and 'value="v2"' in page  # the next label suggested
    assert "Quote prices from the price list.</textarea>" in page  # the form starts from the newest version

    api = server.admin()
    r = api.post("/api/v1/guidelines", json={"label": "v2", "text": "v2 text", "rubric": ["A", "B", "A"]})
    assert r.status_code == 422 and "rubric[2]: 'A' is listed twice" in r.json()["error"]["message"]
    r = admin.post("/admin/guidelines", data={"label": "v1", "text": "", "rubric": "", "csrf_token": csrf})
    assert r.status_code == 409 and "guideline.label: &#39;v1&#39; already exists" in r.text
    r = api.post("/api/v1/guidelines", json={"label": "v2", "text": "v2 text", "rubric": ["A", "B"]})
    assert r.status_code == 201 and r.json()["rubric"] == ["A", "B"]
    gs = api.get("/api/v1/guidelines").json()
    assert [g["label"] for g in gs] == ["v1", "v2"]
    assert gs[0]["text"] == "Answer the question asked.\nQuote prices from the price list."
    # a round created without a version takes the newest
    r = api.post("/api/v1/rounds", json={"name": "week 2", "pair_ids": ["p0"], "overlap": 1})
    assert r.status_code == 201 and r.json()["guideline_version"] == "v2"


def test_error_pages_keep_the_signed_in_navigation(served):
    server, _, _ = served
    admin, _ = _signed_in(server)
    r = admin.get("/admin/rounds/999")
    assert r.status_code == 404 and 'href="/admin">Admin</a>' in r.text and "Sign out" in r.text
    anonymous = httpx.Client(base_url=server.url, timeout=30)
    r = anonymous.get("/no/such/page")
    assert r.status_code == 404 and "Sign out" not in r.text


def test_admin_sees_a_rounds_agreement_with_cis(tmp_path):
    import uuid

    server = Server(db_url=f"sqlite:///{tmp_path / 'store.db'}", log_path=tmp_path / "serve.log").start()
    try:
        with server.admin() as api:
            rid, raters = make_round(api, n_pairs=4, n_raters=2, overlap=2, name="week 1")
            r = api.get(f"/api/v1/rounds/{rid}/agreement")
            assert r.status_code == 409 and "no item has two raters' judgements yet" in r.json()["error"]["message"]
            for _, token in raters:  # both raters pick the left side on all four items
                c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
                while (task := c.get(f"/api/v1/rounds/{rid}/next").json()["task"]) is not None:
                    assert c.post(f"/api/v1/rounds/{rid}/judgements", json={
                        "assignment_id": task["assignment_id"], "choice": "left", "strength": 2,
                        "rationale": "reads better", "idempotency_key": uuid.uuid4().hex}).status_code == 201
            a = api.get(f"/api/v1/rounds/{rid}/agreement").json()
            assert a["n_items"] == 4 and a["n_raters"] == 2
            assert set(a["statistics"]) == {"mean_pairwise_kappa", "fleiss_kappa", "krippendorff_alpha",
                                            "percent_agreement"}
            assert all(-1 <= st["low"] <= st["high"] <= 1 for st in a["statistics"].values() if st["low"] is not None)
        admin, _ = _signed_in(server)
        assert f'href="/admin/rounds/{rid}/agreement"' in admin.get(f"/admin/rounds/{rid}").text
        page = admin.get(f"/admin/rounds/{rid}/agreement")
        assert page.status_code == 200 and "Fleiss&#39; kappa" in page.text and 'id="per-rater"' in page.text
        assert "week 1-rater0" in page.text and "4 items judged by two or more of 2 raters" in page.text
    finally:
        server.kill()


def test_a_round_from_an_uploaded_pairs_file_takes_only_those_pairs(served):
    server, _, _ = served
    admin, csrf = _signed_in(server)
    files = {"pairs_file": ("two.jsonl", b'{"id": "p0"}\n{"id": "p2"}\n', "application/json")}
    r = admin.post("/admin/rounds", data={"name": "two only", "overlap": "1", "duplicate_rate": "0",
                                          "min_rationale_chars": "5", "csrf_token": csrf}, files=files,
                   follow_redirects=True)
    assert r.status_code == 200 and "Round “two only” created with 2 items." in r.text
    r = admin.post("/admin/rounds", data={"name": "all of them", "overlap": "1", "duplicate_rate": "0",
                                          "min_rationale_chars": "5", "csrf_token": csrf}, follow_redirects=True)
    assert "Round “all of them” created with 3 items." in r.text  # no file: every imported pair


def test_a_round_the_raters_cannot_complete_is_said_by_the_api_the_form_and_the_round_page(served):
    """Overlap 3 with 2 raters and the admin: no item completes unless the admin rates. The API's answer,
    the form's message and the round page say so (only `store round` did)."""
    server, _, _ = served
    with server.admin() as api:
        r = api.post("/api/v1/rounds", json={"name": "needs admin", "overlap": 3, "duplicate_rate": 0})
        assert r.status_code == 201
        assert r.json()["warnings"] == ["overlap 3 but only 2 active raters who are not admins: no item is complete "
                                        "until an admin (admin) rates it too"]
        r = api.post("/api/v1/rounds", json={"name": "too wide", "overlap": 9, "duplicate_rate": 0})
        assert r.json()["warnings"] == ["only 3 active raters (1 of them admin) for overlap 9: no item can be "
                                        "completed"]
        rid = r.json()["id"]
        assert api.post("/api/v1/rounds", json={"name": "fine", "overlap": 2}).json()["warnings"] == []
    admin, csrf = _signed_in(server)
    r = admin.post("/admin/rounds", data={"name": "form wide", "overlap": "9", "csrf_token": csrf},
                   follow_redirects=True)
    assert "Round “form wide” created with 3 items. Warning: only 3 active raters" in r.text
    page = admin.get(f"/admin/rounds/{rid}").text
    assert 'class="notice warning" role="alert">only 3 active raters (1 of them admin) for overlap 9' in page
