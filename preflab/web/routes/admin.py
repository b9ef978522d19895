"""Admin pages: dashboard (rounds, raters, guidelines, import, create round, add rater, alerts),
round progress and agreement.

Forms follow post/redirect/get: a post that succeeds redirects to the page, which shows its
message once (an encrypted, signed 60-second cookie carries it across the redirect; a new
rater's password and token too), so reloading never posts again and a secret is shown once.
A GET on a form's address (a bookmark, the browser's history) lands on the dashboard.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from preflab.web import schemas as w
from preflab.web import security as sec
from preflab.web.deps import AdminUser, csrf_guard, run_store, set_session_cookie, signed_in_session
from preflab.web.errors import WebError
from preflab.web.routes.api import (
    RaterId,
    RoundId,
    admin_rounds,
    alerts,
    create_guideline,
    create_rater,
    create_round_op,
    own_round,
    progress_rows,
    reset_credentials,
    update_rater,
)
from preflab.web.routes.pages import render
from preflab.web.transfer import pair_ids_of

router = APIRouter(prefix="/admin", include_in_schema=False, dependencies=[Depends(csrf_guard)])


def _flash_cookie(request: Request) -> str:
    return request.app.state.settings.cookie_name + "_flash"


def _done(request: Request, message: str, to: str = "/admin", *, created: dict | None = None) -> RedirectResponse:
    """Post/redirect/get: ``to`` shows ``message`` (and ``created``: a rater's new password and token)
    once; a reload does not post the form again."""
    import json

    settings = request.app.state.settings
    resp = RedirectResponse(to, status_code=303)
    payload = json.dumps({"message": message, "created": created})
    resp.set_cookie(_flash_cookie(request), sec.sign_flash(payload, settings.secret_key), max_age=60,
                    httponly=True, samesite="lax", secure=settings.cookie_secure, path="/admin")
    return resp


def _take_flash(request: Request, resp: HTMLResponse) -> None:
    """Move the one-time message of a redirected post into the page (and forget it)."""
    name = _flash_cookie(request)
    if name in request.cookies:
        resp.delete_cookie(name, path="/admin")


def _read_flash(request: Request) -> dict:
    """``{"message", "created"}`` of a redirected post, or {} (none, expired or tampered with)."""
    import json

    text = sec.read_flash(request.cookies.get(_flash_cookie(request)), request.app.state.settings.secret_key)
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _form_error(e: ValidationError) -> WebError:
    err = e.errors()[0]
    return WebError(422, "invalid_input", f"{'.'.join(map(str, err['loc']))}: {err['msg']}")


def _dashboard(request: Request, user) -> HTMLResponse:  # noqa: ANN001
    from preflab.store import ops
    from preflab.store.schema import ROUND_KINDS

    def load(s):  # noqa: ANN001, ANN202
        return (ops.list_guidelines(s, project_id=user.project_id),
                len(ops.list_pairs(s, project_id=user.project_id)), ops.list_raters(s, project_id=user.project_id))

    guidelines, n_pairs, raters = run_store(request, load, readonly=True)
    flash = _read_flash(request)
    resp = render(request, "admin.html", {
        "user": user, "project": request.app.state.settings.project, "rounds": admin_rounds(request, user),
        "alerts": alerts(request, user), "guidelines": guidelines[::-1], "n_pairs": n_pairs, "kinds": ROUND_KINDS,
        "raters": raters, "flash": flash.get("message"), "created": flash.get("created"),
        "next_label": _next_label([g.label for g in guidelines])})
    _take_flash(request, resp)
    return resp


def _next_label(labels: list[str]) -> str:
    """A suggestion for the next guideline label: v1 after none, v3 after v2, else the newest + ".1"."""
    import re

    if not labels:
        return "v1"
    m = re.fullmatch(r"v(\d+)", labels[-1])
    nxt = f"v{int(m.group(1)) + 1}" if m else labels[-1] + ".1"
    while nxt in labels:
        nxt += ".1"
    return nxt


@router.get("")
def admin_home(request: Request, user: AdminUser) -> HTMLResponse:
    return _dashboard(request, user)


@router.get("/import")
@router.get("/rounds")
@router.get("/raters")
@router.get("/guidelines")
@router.get("/raters/{rater_id}")
@router.get("/raters/{rater_id}/{action}")
@router.get("/rounds/{round_id}/status")
def admin_form_address(user: AdminUser) -> RedirectResponse:
    """A form's address opened with GET (history, a bookmark, a reload's leftover URL): the dashboard."""
    return RedirectResponse("/admin", status_code=303)


async def _upload_text(f: UploadFile, limit: int, what: str) -> str:
    raw = await f.read(limit + 1)
    if len(raw) > limit:
        raise WebError(413, "too_large", f"{what}: larger than {limit} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebError(400, "invalid_input", f"{what}: not UTF-8 text") from None


@router.post("/import")
async def admin_import(request: Request, user: AdminUser, kind: Annotated[str, Form()],
                       file: UploadFile) -> HTMLResponse:
    from starlette.concurrency import run_in_threadpool

    from preflab.web.transfer import import_jsonl

    if kind not in ("prompts", "pairs"):
        raise WebError(422, "invalid_input", "kind: must be 'prompts' or 'pairs'")
    text = await _upload_text(file, request.app.state.settings.max_body_bytes, file.filename or f"{kind}.jsonl")
    counts = await run_in_threadpool(
        lambda: run_store(request, lambda s: import_jsonl(s, project_id=user.project_id, kind=kind, text=text,
                                                        filename=file.filename)))
    return _done(request, "Imported " + ", ".join(f"{v} new {k}" for k, v in counts.items()) + ".")


@router.post("/rounds")
async def admin_create_round(
    request: Request, user: AdminUser, name: Annotated[str, Form()], kind: Annotated[str, Form()] = "collection",
    guideline_version: Annotated[str, Form()] = "", pairs_file: UploadFile | None = None,
    overlap: Annotated[int, Form()] = 3,
    duplicate_rate: Annotated[float, Form()] = 0.1, min_rationale_chars: Annotated[int, Form()] = 20,
    allow_ties: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Create a round from the pair ids in an uploaded JSONL file, or, with no file chosen, from every
    imported pair."""
    from starlette.concurrency import run_in_threadpool

    pair_ids = None
    if pairs_file is not None and pairs_file.filename:
        text = await _upload_text(pairs_file, request.app.state.settings.max_body_bytes, pairs_file.filename)
        from preflab.store.ops import StoreError

        try:
            pair_ids = pair_ids_of(text, pairs_file.filename)
        except StoreError as e:
            raise WebError(400, "invalid_input", str(e)) from None
    try:
        body = w.RoundCreate(name=name, kind=kind, guideline_version=guideline_version or None, pair_ids=pair_ids,
                             overlap=overlap, duplicate_rate=duplicate_rate, min_rationale_chars=min_rationale_chars,
                             allow_ties=bool(allow_ties))
    except ValidationError as e:
        raise _form_error(e) from None
    r = await run_in_threadpool(lambda: create_round_op(request, user, body))
    return _done(request, f"Round “{r.name}” created with {r.n_items} items."
                 + "".join(f" Warning: {w}." for w in r.warnings))


@router.post("/raters")
def admin_add_rater(request: Request, user: AdminUser, name: Annotated[str, Form()], role: Annotated[str, Form()] = "rater",
                    specialties: Annotated[str, Form()] = "",
                    hourly_rate: Annotated[str, Form()] = "0") -> RedirectResponse:
    try:
        body = w.RaterCreate(name=name, role=role, hourly_rate=_rate(hourly_rate), specialties=_specialties(specialties))
    except ValidationError as e:
        raise _form_error(e) from None
    made = create_rater(request, body, user)
    return _done(request, f"Rater “{made.name}” added.", created={"name": made.name, "password": made.password,
                                                                  "token": made.token, "what": "created"})


@router.get("/rounds/{round_id}")
def admin_round_page(request: Request, round_id: RoundId, user: AdminUser) -> HTMLResponse:
    from preflab.collect.assign import round_routing_gaps
    from preflab.store import ops

    info = own_round(request, user, round_id)
    prog, gaps = run_store(request, lambda s: (ops.round_progress(s, round_id=round_id),
                                               round_routing_gaps(s, round_id=round_id)), readonly=True)
    rows = progress_rows(prog)  # one read of the store for the round's and the raters' figures
    resp = render(request, "admin_round.html", {"user": user, "flash": _read_flash(request).get("message"), "round": {
        "id": info.id, "name": info.name, "kind": info.kind, "overlap": info.overlap, "status": info.status,
        "guideline_version": info.guideline_label, "n_items": prog.n_items, "items_complete": prog.items_complete,
        "lease_s": info.lease_s},
        "progress": rows, "warnings": gaps if info.status == "open" else []})
    _take_flash(request, resp)
    return resp


@router.get("/rounds/{round_id}/agreement")
def admin_round_agreement(request: Request, round_id: RoundId, user: AdminUser) -> HTMLResponse:
    """How far the round's raters agree, with 95% CIs (computed on request: a bootstrap over items)."""
    from preflab.web.routes.api import round_agreement

    a = round_agreement(request, round_id, user)
    worst_first = sorted(a["raters"].items(), key=lambda kv: (kv[1]["agreement_with_majority"] is None,
                                                              kv[1]["agreement_with_majority"] or 0.0))
    return render(request, "admin_agreement.html", {"user": user, "a": a, "raters": worst_first})


@router.post("/rounds/{round_id}/status")
def admin_round_status(request: Request, round_id: RoundId, user: AdminUser, status: Annotated[str, Form()],
                       back: Annotated[str, Form()] = "") -> RedirectResponse:
    """Close a round (it hands out no more tasks and takes no judgements) or open it again; ``back``
    "round" returns to the round's page, anything else to the dashboard."""
    from preflab.store import ops

    info = own_round(request, user, round_id)
    run_store(request, lambda s: ops.set_round_status(s, round_id=round_id, status=status))
    return _done(request, f"Round “{info.name}” is {status}.",
                 to=f"/admin/rounds/{round_id}" if back == "round" else "/admin")


@router.post("/raters/{rater_id}/active")
def admin_rater_active(request: Request, rater_id: RaterId, user: AdminUser, active: Annotated[str, Form()]) -> RedirectResponse:
    """Deactivate a rater (they can no longer sign in or take tasks; their judgements stay) or reactivate."""
    if active not in ("0", "1"):
        raise WebError(422, "invalid_input", f"active: must be 0 or 1, got {active!r}")
    r = update_rater(request, rater_id, w.RaterUpdate(active=active == "1"), user)
    return _done(request, f"Rater “{r.name}” is {'active' if r.active else 'deactivated'}.")


@router.post("/raters/{rater_id}")
def admin_rater_edit(request: Request, rater_id: RaterId, user: AdminUser, specialties: Annotated[str, Form()] = "",
                     hourly_rate: Annotated[str, Form()] = "",
                     role: Annotated[str, Form()] = "rater") -> RedirectResponse:
    """Change a rater's specialties (task routing), hourly rate (the cost ledger) and role."""
    try:
        body = w.RaterUpdate(specialties=_specialties(specialties), hourly_rate=_rate(hourly_rate), role=role)
    except ValidationError as e:
        raise _form_error(e) from None
    r = update_rater(request, rater_id, body, user)
    return _done(request, f"Rater “{r.name}” saved: {r.role}, specialties {', '.join(r.specialties) or 'none'}, "
                          f"{r.hourly_rate:g} per hour." + _unknown_topics(request, user, r.specialties))


def _rate(text: str) -> float:
    """An hourly rate from a form field: a number >= 0; empty is refused (it would silently mean 0)."""
    try:
        return float(text.strip())
    except ValueError:
        raise WebError(422, "invalid_input", f"hourly_rate: enter a number (0 for none), got {text!r}") from None


def _specialties(text: str) -> list[str]:
    """The form's comma-separated topics (empty entries dropped; the API cleans the rest: clean_specialties)."""
    return [x for x in (x.strip() for x in text.split(",")) if x]


def _unknown_topics(request: Request, user, specialties) -> str:  # noqa: ANN001
    """A note when a specialty names no topic of the project's prompts (routing matches topics exactly)."""
    from preflab.store import ops

    if not specialties:
        return ""
    topics = run_store(request, lambda s: {p.topic for p in ops.list_prompts(s, project_id=user.project_id)},
                       readonly=True)
    unknown = [x for x in specialties if x not in topics]
    if not unknown or not topics:
        return ""
    return (f" Note: no prompt has the topic {', '.join(map(repr, unknown))} (topics: {', '.join(sorted(topics))}); "
            "routing matches topics exactly.")


@router.post("/raters/{rater_id}/credentials")
def admin_rater_credentials(request: Request, rater_id: RaterId, user: AdminUser) -> RedirectResponse:
    """A new password and API token for a rater, shown once on this page (the old ones stop working)."""
    made = reset_credentials(request, rater_id, user)
    resp = _done(request, f"Rater “{made.name}” has new credentials.", created={
        "name": made.name, "password": made.password, "token": made.token,
        "what": "given new credentials (the old password and token no longer work; "
                "pages signed in with them are signed out)"})
    if made.id == user.id:  # an admin renewing their own: this page stays signed in, their other sessions end
        set_session_cookie(resp, signed_in_session(request, user.id), request.app.state.settings)
    return resp


@router.post("/guidelines")
def admin_guideline(request: Request, user: AdminUser, label: Annotated[str, Form()],
                    text: Annotated[str, Form()] = "", rubric: Annotated[str, Form()] = "") -> RedirectResponse:
    """A new guideline version from the form: label, text, one rubric item per line."""
    try:
        body = w.GuidelineIn(label=label.strip(), text=text.replace("\r\n", "\n"),
                             rubric=[x.strip() for x in rubric.splitlines() if x.strip()])
    except ValidationError as e:
        raise _form_error(e) from None
    g = create_guideline(request, body, user)
    return _done(request, f"Guideline {g.label} saved with {len(g.rubric)} rubric items; it is now the newest "
                          "(new rounds use it; re-rate what it changes).")
