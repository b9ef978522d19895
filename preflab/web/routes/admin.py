"""Admin pages: dashboard (rounds, import, create round, add rater, alerts) and round progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import HTMLResponse
from pydantic import ValidationError

from preflab.web import schemas as w
from preflab.web.deps import AdminUser, csrf_guard, run_store
from preflab.web.errors import WebError
from preflab.web.routes.api import (
    RoundId,
    admin_rounds,
    alerts,
    create_rater,
    create_round_op,
    own_round,
    progress_rows,
)
from preflab.web.routes.pages import render
from preflab.web.transfer import pair_ids_of

router = APIRouter(prefix="/admin", include_in_schema=False, dependencies=[Depends(csrf_guard)])


def _dashboard(request: Request, user, *, flash: str | None = None, created: dict | None = None,  # noqa: ANN001
               status: int = 200) -> HTMLResponse:
    from preflab.store import ops
    from preflab.store.schema import ROUND_KINDS

    def load(s):  # noqa: ANN001, ANN202
        return ([g.label for g in ops.list_guidelines(s, project_id=user.project_id)],
                len(ops.list_pairs(s, project_id=user.project_id)), ops.list_raters(s, project_id=user.project_id))

    guidelines, n_pairs, raters = run_store(request, load, readonly=True)
    return render(request, "admin.html", {
        "user": user, "project": request.app.state.settings.project, "rounds": admin_rounds(request, user),
        "alerts": alerts(request, user), "guidelines": guidelines[::-1], "n_pairs": n_pairs, "kinds": ROUND_KINDS,
        "raters": raters, "flash": flash, "created": created}, status=status)


@router.get("")
def admin_home(request: Request, user: AdminUser) -> HTMLResponse:
    return _dashboard(request, user)


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
    msg = "Imported " + ", ".join(f"{v} new {k}" for k, v in counts.items()) + "."
    return await run_in_threadpool(lambda: _dashboard(request, user, flash=msg))


@router.post("/rounds")
async def admin_create_round(
    request: Request, user: AdminUser, name: Annotated[str, Form()], kind: Annotated[str, Form()] = "collection",
    guideline_version: Annotated[str, Form()] = "", pair_source: Annotated[str, Form()] = "all",
    pairs_file: UploadFile | None = None, overlap: Annotated[int, Form()] = 3,
    duplicate_rate: Annotated[float, Form()] = 0.1, min_rationale_chars: Annotated[int, Form()] = 20,
    allow_ties: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Create a round from all imported pairs, or from the pair ids in an uploaded JSONL file."""
    from starlette.concurrency import run_in_threadpool

    pair_ids = None
    if pair_source == "upload":
        if pairs_file is None or not pairs_file.filename:
            raise WebError(422, "invalid_input", "pairs_file: choose a JSONL file with a pair_id per line")
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
        err = e.errors()[0]
        raise WebError(422, "invalid_input", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    r = await run_in_threadpool(lambda: create_round_op(request, user, body))
    return await run_in_threadpool(lambda: _dashboard(request, user, flash=f"Round “{r.name}” created with {r.n_items} items."))


@router.post("/raters")
def admin_add_rater(request: Request, user: AdminUser, name: Annotated[str, Form()], role: Annotated[str, Form()] = "rater",
                    specialties: Annotated[str, Form()] = "", hourly_rate: Annotated[float, Form()] = 0.0) -> HTMLResponse:
    try:
        body = w.RaterCreate(name=name, role=role, hourly_rate=hourly_rate,
                             specialties=[x.strip() for x in specialties.split(",") if x.strip()])
    except ValidationError as e:
        err = e.errors()[0]
        raise WebError(422, "invalid_input", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    made = create_rater(request, body, user)
    return _dashboard(request, user, created={"name": made.name, "password": made.password, "token": made.token})


@router.get("/rounds/{round_id}")
def admin_round_page(request: Request, round_id: RoundId, user: AdminUser) -> HTMLResponse:
    from preflab.store import ops

    info = own_round(request, user, round_id)
    prog = run_store(request, lambda s: ops.round_progress(s, round_id=round_id), readonly=True)
    rows = progress_rows(prog)  # one read of the store for the round's and the raters' figures
    return render(request, "admin_round.html", {"user": user, "round": {
        "id": info.id, "name": info.name, "kind": info.kind, "overlap": info.overlap,
        "guideline_version": info.guideline_label, "n_items": prog.n_items, "items_complete": prog.items_complete},
        "progress": rows})


@router.post("/rounds/{round_id}/status")
def admin_round_status(request: Request, round_id: RoundId, user: AdminUser,
                       status: Annotated[str, Form()]) -> HTMLResponse:
    """Close a round (it hands out no more tasks and takes no judgements) or open it again."""
    from preflab.store import ops

    info = own_round(request, user, round_id)
    run_store(request, lambda s: ops.set_round_status(s, round_id=round_id, status=status))
    return _dashboard(request, user, flash=f"Round “{info.name}” is {status}.")


@router.post("/raters/{rater_id}/active")
def admin_rater_active(request: Request, rater_id: int, user: AdminUser, active: Annotated[str, Form()]) -> HTMLResponse:
    """Deactivate a rater (they can no longer sign in or take tasks; their judgements stay) or reactivate."""
    from preflab.store import ops

    if active not in ("0", "1"):
        raise WebError(422, "invalid_input", f"active: must be 0 or 1, got {active!r}")

    def change(s):  # noqa: ANN001, ANN202
        r = ops.get_rater(s, rater_id=rater_id)
        if r.project_id != user.project_id:
            raise ops.StoreError(f"rater {rater_id} not found", code="not_found")
        if r.id == user.id and active != "1":
            raise ops.StoreError("you cannot deactivate yourself", code="conflict")
        return ops.update_rater(s, rater_id=rater_id, active=active == "1")

    r = run_store(request, change)
    return _dashboard(request, user, flash=f"Rater “{r.name}” is {'active' if r.active else 'deactivated'}.")
