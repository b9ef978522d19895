"""The JSON API (``/api/v1``): everything the pages do, for the pages' JS and for scripts.

Routes are plain ``def`` (run in the threadpool): each does one store op in one transaction
through ``run_store`` and returns a wire schema; no SQL here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from preflab.web import schemas as w
from preflab.web.deps import AdminUser, CurrentUser, Settings, csrf_guard, run_store
from preflab.web.errors import WebError

# ids beyond 2**62 would overflow a database integer: reject them as bad input
RoundId = Annotated[int, Path(ge=1, le=2**62, description="Round id")]
RaterId = Annotated[int, Path(ge=1, le=2**62, description="Rater id")]

router = APIRouter(prefix="/api/v1", tags=["api"], dependencies=[Depends(csrf_guard)])

JSONL_BODY = {"requestBody": {"required": True, "content": {
    "application/x-ndjson": {"schema": {"type": "string", "description": "one JSON object per line"}}}}}


def _ops():  # noqa: ANN202 - heavy import kept out of module import
    from preflab.store import ops

    return ops


def own_round(request: Request, user, round_id: int):  # noqa: ANN001, ANN201
    """The round if it belongs to the user's project (else 404, never a hint that it exists)."""
    ops = _ops()
    info = run_store(request, lambda s: ops.get_round(s, round_id=round_id), readonly=True)
    if info.project_id != user.project_id:
        raise WebError(404, "not_found", f"round {round_id} not found")
    return info


def rater_round(request: Request, user, info) -> w.RoundOut:  # noqa: ANN001
    ops = _ops()
    p = run_store(request, lambda s: ops.progress(s, round_id=info.id, rater_id=user.id), readonly=True)
    return w.RoundOut(id=info.id, name=info.name, kind=info.kind, allow_ties=info.allow_ties,
                      min_rationale_chars=info.min_rationale_chars, guideline_version=info.guideline_label,
                      progress=w.Progress(done=p.done, total=p.total))


@router.get("/me", response_model=w.Me)
def me(user: CurrentUser) -> w.Me:
    """Who the token or session belongs to."""
    return w.Me(id=user.id, name=user.name, role=user.role)


@router.get("/rounds", response_model=list[w.RoundOut])
def rounds(request: Request, user: CurrentUser) -> list[w.RoundOut]:
    """Open rounds of the project, with the caller's own progress."""
    ops = _ops()
    infos = run_store(request, lambda s: ops.list_rounds(s, project_id=user.project_id), readonly=True)
    return [rater_round(request, user, r) for r in infos if r.status == "open"]


@router.get("/rounds/{round_id}/next", response_model=w.NextOut)
def next_task(request: Request, round_id: RoundId, user: CurrentUser) -> w.NextOut:
    """Lease the caller's next comparison (the same one again until it is judged); task null = nothing left
    for the caller now, or the round is closed (``closed``)."""
    ops = _ops()
    # no separate round lookup: next_task itself refuses a round of another project (403) or an unknown one (404)

    def lease(s):  # noqa: ANN001, ANN202
        t = ops.next_task(s, round_id=round_id, rater_id=user.id)
        if t is not None:
            return t, None, False
        return None, ops.progress(s, round_id=round_id, rater_id=user.id), ops.get_round(s, round_id=round_id).status

    task, prog, status = run_store(request, lease)
    if task is None:
        return w.NextOut(task=None, progress=w.Progress(done=prog.done, total=prog.total), closed=status == "closed")
    return w.NextOut(task=w.TaskOut(assignment_id=task.assignment_id, prompt=task.prompt_text,
                                    left=w.Side(text=task.left_text), right=w.Side(text=task.right_text)),
                     progress=w.Progress(done=task.done, total=task.total))


@router.post("/rounds/{round_id}/judgements", response_model=w.JudgementOut,
             responses={409: {"description": "assignment already judged under another key"}})
def submit(request: Request, round_id: RoundId, body: w.JudgementIn, user: CurrentUser, settings: Settings,
           response: Response) -> w.JudgementOut:
    """Store the caller's judgement against the canonical response ids; idempotent on the key.

    Time on task is the client's measurement, clipped to ``[0, max_time_on_task_s]``.
    Answers 201 when stored now and 200 when the key had been stored before (``replayed``).
    """
    ops = _ops()
    # the store checks that the assignment is the caller's; the round in the URL is checked in the transaction
    if len(body.rationale) > settings.max_rationale_chars:
        raise WebError(422, "invalid_input", f"rationale: at most {settings.max_rationale_chars} characters")
    seconds = min(max(body.time_on_task_s, 0.0), settings.max_time_on_task_s)

    def store(s):  # noqa: ANN001, ANN202
        rec = ops.submit_judgement(s, assignment_id=body.assignment_id, rater_id=user.id, choice=body.choice,
                                   strength=body.strength, rationale=body.rationale, time_on_task_s=seconds,
                                   idempotency_key=body.idempotency_key)
        if rec.round_id != round_id:  # raised inside the transaction: rolls the judgement back
            raise WebError(404, "not_found", f"assignment {body.assignment_id} is not in round {round_id}")
        return rec

    # the write transaction holds SQLite's lock: keep it to the one op (progress comes with the next task)
    rec = run_store(request, store)
    response.status_code = 200 if rec.replayed else 201
    return w.JudgementOut(judgement_id=rec.id, assignment_id=rec.assignment_id, replayed=rec.replayed)


@router.get("/me/judgements/{idempotency_key}", response_model=w.JudgementOut)
def my_judgement(request: Request, idempotency_key: Annotated[str, Path(pattern=w.IDEM_PATTERN)], user: CurrentUser) -> w.JudgementOut:
    """Was the caller's submission with this key stored? (For a client that lost the answer.)"""
    ops = _ops()
    rec = run_store(request, lambda s: ops.judgement_by_key(s, rater_id=user.id, idempotency_key=idempotency_key),
                    readonly=True)
    if rec is not None:
        return w.JudgementOut(judgement_id=rec.id, assignment_id=rec.assignment_id, replayed=True)
    raise WebError(404, "not_found", f"no judgement of yours with idempotency key {idempotency_key!r}")


# ---- admin ----------------------------------------------------------------------------------


def admin_round(request: Request, info) -> w.RoundAdminOut:  # noqa: ANN001
    ops = _ops()
    prog = run_store(request, lambda s: ops.round_progress(s, round_id=info.id), readonly=True)
    return w.RoundAdminOut(id=info.id, name=info.name, kind=info.kind, status=info.status, overlap=info.overlap,
                           duplicate_rate=info.duplicate_rate, allow_ties=info.allow_ties,
                           min_rationale_chars=info.min_rationale_chars, guideline_version=info.guideline_label,
                           n_items=info.n_items, n_judgements=prog.n_judgements)


def create_round_op(request: Request, user, body: w.RoundCreate) -> w.RoundAdminOut:  # noqa: ANN001
    """Shared by the API and the admin form: resolve guideline label and 'all pairs', create."""
    ops = _ops()

    def create(s):  # noqa: ANN001, ANN202
        gid = None
        if body.guideline_version:
            found = [g for g in ops.list_guidelines(s, project_id=user.project_id) if g.label == body.guideline_version]
            if not found:
                raise WebError(404, "not_found", f"guideline_version: unknown label {body.guideline_version!r}")
            gid = found[0].id
        pair_ids = body.pair_ids
        if pair_ids is None:
            pair_ids = [p.id for p in ops.list_pairs(s, project_id=user.project_id)]
            if not pair_ids:
                raise WebError(400, "invalid_input", "pair_ids: the project has no pairs yet; import some first")
        rid = ops.create_round(s, project_id=user.project_id, name=body.name, kind=body.kind, pair_ids=pair_ids,
                               guideline_version_id=gid, overlap=body.overlap, duplicate_rate=body.duplicate_rate,
                               allow_ties=body.allow_ties, min_rationale_chars=body.min_rationale_chars,
                               routing=body.routing, fallback=body.fallback, fallback_after_s=body.fallback_after_s,
                               seed=body.seed, lease_s=float(request.app.state.settings.lease_s))
        return ops.get_round(s, round_id=rid), round_routing_gaps(s, round_id=rid)

    from preflab.collect.assign import round_routing_gaps

    info, gaps = run_store(request, create)
    return admin_round(request, info).model_copy(update={"warnings": gaps})


@router.get("/admin/rounds", response_model=list[w.RoundAdminOut])
def admin_rounds(request: Request, user: AdminUser) -> list[w.RoundAdminOut]:
    """Every round of the project with counts (admin)."""
    ops = _ops()
    infos = run_store(request, lambda s: ops.list_rounds(s, project_id=user.project_id), readonly=True)
    return [admin_round(request, r) for r in infos]


@router.post("/rounds", response_model=w.RoundAdminOut, status_code=201)
def create_round(request: Request, body: w.RoundCreate, user: AdminUser) -> w.RoundAdminOut:
    """Create a round from imported pairs (admin)."""
    return create_round_op(request, user, body)


@router.get("/rounds/{round_id}/progress", response_model=list[w.ProgressRow])
def round_progress(request: Request, round_id: RoundId, user: AdminUser) -> list[w.ProgressRow]:
    """Judgements done and tasks in hand per rater (admin)."""
    ops = _ops()
    own_round(request, user, round_id)
    return progress_rows(run_store(request, lambda s: ops.round_progress(s, round_id=round_id), readonly=True))


@router.get("/rounds/{round_id}/agreement")
def round_agreement(request: Request, round_id: RoundId, user: AdminUser) -> dict:
    """Agreement between the round's raters with 95% bootstrap CIs (admin): mean pairwise Cohen's kappa,
    Fleiss' kappa, Krippendorff's alpha, raw agreement; per rater, agreement with the others' majority.

    Cached in this process per (round, number of judgements, newest judgement id), 32 entries, least
    recently used first out: admins refreshing the page cost one count query until a judgement arrives.
    Nothing another worker needs lives there (each worker computes its own on a miss)."""
    import copy

    from preflab.collect.workshop import round_agreement as agreement
    from preflab.collect.workshop import round_judgement_version

    own_round(request, user, round_id)
    lock, cache = request.app.state.agreement_cache  # made with the app (web.app)

    def cached(s) -> dict:  # noqa: ANN001
        key = (round_id, *round_judgement_version(s, round_id=round_id))
        with lock:
            if key in cache:
                cache.move_to_end(key)
                return cache[key]
        result = agreement(s, round_id=round_id)
        with lock:
            cache[key] = result
            while len(cache) > 32:
                cache.popitem(last=False)
        return result

    return copy.deepcopy(run_store(request, cached, readonly=True))


def progress_rows(prog) -> list[w.ProgressRow]:  # noqa: ANN001
    """A round's ``ops.RoundProgress`` as the rows the API and the admin round page show."""
    return [w.ProgressRow(rater=r.rater_name, rater_id=r.rater_id, done=r.done, total=r.done + r.leased,
                          expired=r.expired) for r in prog.raters]


def clean_specialties(names: list[str]) -> list[str]:
    """Topics a rater is routed first: trimmed, none empty, each once ("Billing, billing" is one)."""
    seen: dict[str, str] = {}
    for x in (x.strip() for x in names):
        if not x:
            raise WebError(422, "invalid_input", "specialties: an empty domain name")
        seen.setdefault(x.lower(), x)
    return list(seen.values())


@router.post("/raters", response_model=w.RaterCreated, status_code=201)
def create_rater(request: Request, body: w.RaterCreate, user: AdminUser) -> w.RaterCreated:
    """Add a rater (admin); the password and API token are returned once, only hashes are stored."""
    import secrets

    ops = _ops()
    password = body.password or secrets.token_urlsafe(12)

    def create(s):  # noqa: ANN001, ANN202
        rid = ops.create_rater(s, project_id=user.project_id, name=body.name, password=password, role=body.role,
                               specialties=clean_specialties(body.specialties), hourly_rate=body.hourly_rate)
        return rid, ops.issue_api_token(s, rater_id=rid)

    rid, token = run_store(request, create)
    return w.RaterCreated(id=rid, name=body.name, role=body.role, password=password, token=token)


def _rater_out(r) -> w.RaterOut:  # noqa: ANN001
    return w.RaterOut(id=r.id, name=r.name, role=r.role, specialties=list(r.specialties), hourly_rate=r.hourly_rate,
                      active=r.active)


def _own_rater(s, user, rater_id: int):  # noqa: ANN001, ANN202
    """The rater if they belong to the user's project (else not found, never a hint that they exist)."""
    ops = _ops()
    try:
        r = ops.get_rater(s, rater_id=rater_id)
    except ops.StoreError:
        r = None
    if r is None or r.project_id != user.project_id:
        raise ops.StoreError(f"rater {rater_id} not found", code="not_found")
    return r


@router.get("/raters", response_model=list[w.RaterOut])
def list_raters(request: Request, user: AdminUser) -> list[w.RaterOut]:
    """Every rater of the project, active or not (admin)."""
    ops = _ops()
    return [_rater_out(r) for r in run_store(request, lambda s: ops.list_raters(s, project_id=user.project_id),
                                             readonly=True)]


@router.patch("/raters/{rater_id}", response_model=w.RaterOut)
def update_rater(request: Request, rater_id: RaterId, body: w.RaterUpdate, user: AdminUser) -> w.RaterOut:
    """Change a rater's role, specialties, hourly rate or active flag (admin). A deactivated rater is
    signed out everywhere at once; their judgements stay. An admin cannot deactivate or demote themself."""
    ops = _ops()
    specialties = None if body.specialties is None else clean_specialties(body.specialties)

    def change(s):  # noqa: ANN001, ANN202
        r = _own_rater(s, user, rater_id)
        if r.id == user.id and (body.active is False or body.role == "rater"):
            raise ops.StoreError("you cannot deactivate or demote yourself (another admin can)", code="conflict")
        return ops.update_rater(s, rater_id=rater_id, active=body.active, role=body.role, specialties=specialties,
                                hourly_rate=body.hourly_rate)

    return _rater_out(run_store(request, change))


@router.post("/raters/{rater_id}/credentials", response_model=w.RaterCreated)
def reset_credentials(request: Request, rater_id: RaterId, user: AdminUser,
                      body: w.CredentialsReset | None = None) -> w.RaterCreated:
    """A new password and API token for a rater (admin), returned once: the old password and token stop
    working at once, and pages signed in with them are signed out."""
    import secrets

    ops = _ops()
    password = (body.password if body else None) or secrets.token_urlsafe(12)

    def reset(s):  # noqa: ANN001, ANN202
        r = _own_rater(s, user, rater_id)
        ops.set_password(s, rater_id=r.id, password=password)
        return r, ops.issue_api_token(s, rater_id=r.id)

    r, token = run_store(request, reset)
    return w.RaterCreated(id=r.id, name=r.name, role=r.role, password=password, token=token)


def _guideline_out(g) -> w.GuidelineOut:  # noqa: ANN001
    return w.GuidelineOut(label=g.label, text=g.text, rubric=list(g.rubric), created_at=g.created_at)


@router.get("/guidelines", response_model=list[w.GuidelineOut])
def list_guidelines(request: Request, user: AdminUser) -> list[w.GuidelineOut]:
    """Guideline versions of the project, oldest first; the last is the newest (admin)."""
    ops = _ops()
    return [_guideline_out(g) for g in run_store(
        request, lambda s: ops.list_guidelines(s, project_id=user.project_id), readonly=True)]


@router.post("/guidelines", response_model=w.GuidelineOut, status_code=201)
def create_guideline(request: Request, body: w.GuidelineIn, user: AdminUser) -> w.GuidelineOut:
    """Add a guideline version (admin). It becomes the newest: rounds created without a version use it,
    and the reward model trains on judgements made under it (re-rate what it changes)."""
    ops = _ops()
    rubric = [x.strip() for x in body.rubric]
    for i, item in enumerate(rubric):
        if not item:
            raise WebError(422, "invalid_input", f"rubric[{i}]: empty")
        if item in rubric[:i]:
            raise WebError(422, "invalid_input", f"rubric[{i}]: {item!r} is listed twice")

    def create(s):  # noqa: ANN001, ANN202
        gid = ops.create_guideline_version(s, project_id=user.project_id, label=body.label.strip(),
                                           text=body.text, rubric=rubric)
        return ops.get_guideline(s, guideline_id=gid)

    return _guideline_out(run_store(request, create))


@router.get("/alerts", response_model=list[w.AlertOut])
def alerts(request: Request, user: AdminUser, resolved: bool = False) -> list[w.AlertOut]:
    """Rater-quality and other alerts of the project (admin)."""
    ops = _ops()
    rows = run_store(request, lambda s: ops.list_alerts(s, project_id=user.project_id, resolved=resolved),
                     readonly=True)
    return [w.AlertOut(id=a.id, kind=a.kind, message=a.message, rater_id=a.rater_id, round_id=a.round_id,
                       created_at=a.created_at) for a in rows]


def ndjson(text: str, filename: str) -> Response:
    return Response(text, media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/rounds/{round_id}/export", response_class=Response,
            responses={200: {"content": {"application/x-ndjson": {}}}})
def export_round(request: Request, round_id: RoundId, user: AdminUser) -> Response:
    """Download every judgement of a round as JSONL (canonical ids, rater, duplicate flag; admin)."""
    from preflab.web.transfer import export_round_jsonl

    own_round(request, user, round_id)
    text = run_store(request, lambda s: export_round_jsonl(s, project_id=user.project_id, round_id=round_id),
                     readonly=True)
    return ndjson(text, f"round-{round_id}-judgements.jsonl")


@router.get("/export/trl", response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
def export_trl(request: Request, user: AdminUser) -> Response:
    """Download training data in TRL's prompt/chosen/rejected/margin format (admin): the latest
    judgement per (pair, rater) under the newest guideline, ties left out."""
    from preflab.web.transfer import export_trl_jsonl

    text = run_store(request, lambda s: export_trl_jsonl(s, project_id=user.project_id), readonly=True)
    return ndjson(text, "preferences-trl.jsonl")


@router.post("/import/{kind}", response_model=w.ImportOut, openapi_extra=JSONL_BODY)
async def import_jsonl(request: Request, kind: Literal["prompts", "pairs"], user: AdminUser) -> w.ImportOut:
    """Import prompts or pairs (responses inline) from a JSONL body; all or nothing (admin)."""
    from starlette.concurrency import run_in_threadpool

    from preflab.web.transfer import import_jsonl as do_import

    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WebError(400, "invalid_input", f"{kind}.jsonl: not UTF-8 text") from None
    counts = await run_in_threadpool(
        lambda: run_store(request, lambda s: do_import(s, project_id=user.project_id, kind=kind, text=text)))
    return w.ImportOut(kind=kind, counts=counts)
