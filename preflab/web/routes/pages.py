"""Server-rendered pages for raters: sign in/out, the round list and the rating page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from preflab.web import security as sec
from preflab.web.deps import (
    CurrentUser,
    Settings,
    csrf_guard,
    read_cookie_session,
    run_store,
    set_session_cookie,
    signed_in_session,
)
from preflab.web.routes.api import RoundId, own_round, rater_round, rounds

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_guard)])


def render(request: Request, name: str, ctx: dict, *, status: int = 200) -> HTMLResponse:
    """Render a template with the CSRF token of the current (possibly anonymous) session."""
    settings = request.app.state.settings
    sess = read_cookie_session(request)
    fresh = sess is None
    if fresh:
        sess = sec.new_session(None, settings.session_max_age_s)
    resp = request.app.state.templates.TemplateResponse(
        request, name, {"csrf_token": sec.csrf_token(sess, settings.secret_key), "user": None, **ctx},
        status_code=status)
    if fresh:
        set_session_cookie(resp, sess, settings)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def safe_next(target: str | None) -> str:
    """Only same-site relative paths (no open redirect to another host)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    from sqlalchemy import text

    with request.app.state.engine.connect() as c:
        c.execute(text("SELECT 1"))
    return JSONResponse({"ok": True})


@router.get("/login")
def login_page(request: Request, next: str = "/") -> HTMLResponse:
    return render(request, "login.html", {"next": safe_next(next), "error": None})


@router.post("/login")
def login(request: Request, settings: Settings, name: Annotated[str, Form(max_length=200)],
          password: Annotated[str, Form(max_length=500)], next: Annotated[str, Form(max_length=500)] = "/") -> Response:
    """Sign in with name + password (or name + API token); rotates the session nonce."""
    from preflab.store import ops

    pid = request.app.state.project_id
    name = name.strip()  # a name typed with a stray space still signs in

    def check(s):  # noqa: ANN001, ANN202
        info = ops.check_password(s, project_id=pid, name=name, password=password)
        if info is None:
            tok = ops.rater_by_token(s, token=password)
            info = tok if tok is not None and tok.name == name and tok.project_id == pid else None
        if info is None:  # the right password of a deactivated account: say so (it reveals nothing new)
            r = ops.rater_by_name(s, project_id=pid, name=name)
            if r is not None and not r.active and sec.verify_password(ops.password_hash_of(s, rater_id=r.id), password):
                return "inactive"
        return info

    info = run_store(request, check, readonly=True)
    if info is None or info == "inactive":
        error = ("This account is deactivated: ask an admin to reactivate it." if info == "inactive"
                 else "Unknown name or wrong password.")
        return render(request, "login.html", {"next": safe_next(next), "error": error,
                                              "name": name}, status=401)  # the name stays; the password does not
    resp = RedirectResponse(safe_next(next), status_code=303)
    set_session_cookie(resp, signed_in_session(request, info.id), settings)
    return resp


@router.post("/logout")
def logout(settings: Settings) -> Response:
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(settings.cookie_name, path="/")
    return resp


@router.get("/")
def home(user: CurrentUser) -> Response:
    return RedirectResponse("/admin" if user.role == "admin" else "/rate", status_code=303)


@router.get("/rate")
def rate_index(request: Request, user: CurrentUser) -> HTMLResponse:
    rs = rounds(request, user)
    return render(request, "rounds.html", {"user": user, "rounds": [
        {"id": r.id, "name": r.name, "kind": r.kind, "done": r.progress.done, "total": r.progress.total} for r in rs]})


@router.get("/rate/{round_id}")
def rate_page(request: Request, round_id: RoundId, user: CurrentUser, settings: Settings) -> HTMLResponse:
    """The rating page: the JS fetches tasks from ``/api/v1/rounds/{id}/next``."""
    from preflab.store import ops

    info = own_round(request, user, round_id)
    r = rater_round(request, user, info)
    text = None
    if info.guideline_version_id is not None:
        g = run_store(request, lambda s: ops.get_guideline(s, guideline_id=info.guideline_version_id), readonly=True)
        text = g.text or None
    return render(request, "rate.html", {"user": user, "max_rationale_chars": settings.max_rationale_chars,
                                         "round": {"id": r.id, "name": r.name, "allow_ties": r.allow_ties,
                                                   "min_rationale_chars": r.min_rationale_chars,
                                                   "guideline_version": r.guideline_version,
                                                   "lease_s": info.lease_s,  # the page renews it while in use
                                                   "guideline_text": text}})
