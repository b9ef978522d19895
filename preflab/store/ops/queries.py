"""Queries later stages need: judgements with context, planted duplicates, preference examples, progress."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from preflab.store.ops.assign import (
    _choice,
    _record,
)
from preflab.store.ops.base import (
    _now,
    _round,
)
from preflab.store.ops.people import (
    list_guidelines,
)
from preflab.store.ops.records import (
    DuplicatePair,
    JudgementRecord,
    JudgementRow,
    PreferenceExample,
    RaterProgress,
    RoundProgress,
)
from preflab.store.schema import (
    Assignment,
    DuplicateLink,
    GuidelineVersion,
    Judgement,
    Pair,
    Prompt,
    Rater,
    Response,
    Round,
    RoundItem,
)

# ---- queries for later stages ------------------------------------------------------------


def _judgement_rows(session: Session, where: list) -> list[JudgementRow]:  # noqa: ANN001
    ra, rb = aliased(Response), aliased(Response)
    q = (select(Judgement, Assignment, Pair, Prompt, Rater, Round, ra, rb, GuidelineVersion.label)
         .join(Assignment, Assignment.id == Judgement.assignment_id)
         .join(Pair, Pair.id == Judgement.pair_id)
         .join(Prompt, Prompt.id == Pair.prompt_id)
         .join(Rater, Rater.id == Judgement.rater_id)
         .join(Round, Round.id == Judgement.round_id)
         .join(ra, ra.id == Pair.response_a_id)
         .join(rb, rb.id == Pair.response_b_id)
         .outerjoin(GuidelineVersion, GuidelineVersion.id == Judgement.guideline_version_id)
         .where(*where).order_by(Judgement.id))
    out = []
    for j, a, p, pr, r, rnd, resp_a, resp_b, label in session.execute(q):
        out.append(JudgementRow(j.id, a.id, rnd.id, rnd.kind, p.id, pr.id, pr.text, pr.topic, r.id, r.name,
                                resp_a.id, resp_b.id, resp_a.source, resp_b.source, a.left_response_id,
                                j.winner_id, _choice(j.winner_id, p), j.strength, j.rationale, j.time_on_task_s,
                                a.is_duplicate, label, j.created_at))
    return out


def round_judgements(session: Session, *, round_id: int, include_duplicates: bool = True) -> list[JudgementRow]:
    """Every judgement of a round with its pair, prompt, topic, rater and duplicate flag."""
    _round(session, round_id)
    where = [Judgement.round_id == round_id]
    if not include_duplicates:
        where.append(Assignment.is_duplicate.is_(False))
    return _judgement_rows(session, where)


def project_judgements(
    session: Session, *, project_id: int, round_kinds: Sequence[str] | None = None,
) -> list[JudgementRow]:
    """Every judgement of a project (optionally of some round kinds), oldest first."""
    where = [Round.project_id == project_id]
    if round_kinds is not None:
        where.append(Round.kind.in_(list(round_kinds)))
    return _judgement_rows(session, where)


def rater_judgements(session: Session, *, rater_id: int, round_id: int | None = None) -> list[JudgementRecord]:
    """A rater's own judgements (no model identities: safe to show to that rater)."""
    q = (select(Judgement, Assignment).join(Assignment, Assignment.id == Judgement.assignment_id)
         .where(Judgement.rater_id == rater_id).order_by(Judgement.id))
    if round_id is not None:
        q = q.where(Judgement.round_id == round_id)
    return [_record(j, a, replayed=False) for j, a in session.execute(q)]


def judgement_by_key(session: Session, *, rater_id: int, idempotency_key: str) -> JudgementRecord | None:
    """The rater's judgement stored under ``idempotency_key`` (a client checking a lost answer), or None."""
    row = session.execute(select(Judgement, Assignment).join(Assignment, Assignment.id == Judgement.assignment_id)
                          .where(Judgement.rater_id == rater_id, Judgement.idempotency_key == idempotency_key)).first()
    return None if row is None else _record(row[0], row[1], replayed=True)


def duplicate_pairs(
    session: Session, *, project_id: int, round_id: int | None = None,
) -> list[DuplicatePair]:
    """Each planted duplicate with both answers judged (for self-consistency)."""
    jo, jd = aliased(Judgement), aliased(Judgement)
    ao, ad = aliased(Assignment), aliased(Assignment)
    q = (select(DuplicateLink, jo, jd, ao, ad, Rater, Pair)
         .join(jo, jo.assignment_id == DuplicateLink.original_assignment_id)
         .join(jd, jd.assignment_id == DuplicateLink.duplicate_assignment_id)
         .join(ao, ao.id == DuplicateLink.original_assignment_id)
         .join(ad, ad.id == DuplicateLink.duplicate_assignment_id)
         .join(Rater, Rater.id == DuplicateLink.rater_id)
         .join(Pair, Pair.id == DuplicateLink.pair_id)
         .join(Round, Round.id == DuplicateLink.round_id)
         .where(Round.project_id == project_id).order_by(DuplicateLink.id))
    if round_id is not None:
        q = q.where(DuplicateLink.round_id == round_id)
    return [DuplicatePair(link.round_id, r.id, r.name, p.id, _choice(j1.winner_id, p), _choice(j2.winner_id, p),
                          j1.strength, j2.strength, (a2.seq or 0) - (a1.seq or 0) - 1)
            for link, j1, j2, a1, a2, r, p in session.execute(q)]


def preference_examples(
    session: Session,
    *,
    project_id: int,
    round_kinds: Sequence[str] = ("calibration", "collection", "rerate"),
    latest_guideline: bool = True,
    include_ties: bool = True,
) -> list[PreferenceExample]:
    """Training examples: the latest judgement per (pair, rater).

    With ``latest_guideline`` only judgements under the newest guideline version any
    judgement of that pair was made under count (a re-rated pair drops its old labels).
    A planted duplicate and its original count once (the later answer wins).
    """
    rows = project_judgements(session, project_id=project_id, round_kinds=round_kinds)
    order = {g.label: i for i, g in enumerate(list_guidelines(session, project_id=project_id))}

    def rank(label: str | None) -> int:
        return -1 if label is None else order.get(label, -1)

    if latest_guideline:
        newest: dict[str, int] = {}
        for r in rows:
            newest[r.pair_id] = max(newest.get(r.pair_id, -1), rank(r.guideline_label))
        rows = [r for r in rows if rank(r.guideline_label) == newest[r.pair_id]]
    latest: dict[tuple[str, int], JudgementRow] = {}
    for r in rows:  # ordered by judgement id: later overwrites earlier
        latest[(r.pair_id, r.rater_id)] = r
    texts = {}
    ids = sorted({r.response_a_id for r in latest.values()} | {r.response_b_id for r in latest.values()})
    for k in range(0, len(ids), 500):
        for resp in session.scalars(select(Response).where(Response.id.in_(ids[k:k + 500]))):
            texts[resp.id] = resp.text
    out = []
    for r in sorted(latest.values(), key=lambda r: r.judgement_id):
        if r.winner_id is None and not include_ties:
            continue
        chosen = r.winner_id or r.response_a_id
        rejected = r.response_b_id if chosen == r.response_a_id else r.response_a_id
        out.append(PreferenceExample(r.pair_id, r.prompt_text, r.topic, texts[chosen], texts[rejected], chosen,
                                     rejected, r.strength, r.rater_name, r.winner_id is None, r.guideline_label,
                                     r.round_id))
    return out


def round_progress(session: Session, *, round_id: int, now: dt.datetime | None = None) -> RoundProgress:
    """Items, completed items, judgements and per-rater counts of a round (admin view). A lease past
    its time counts as ``expired``, not in hand: its item goes back to the pool at the next request
    for work (a read changes nothing)."""
    now = _now(now)
    rnd = _round(session, round_id)
    n_items = session.scalar(select(func.count()).select_from(RoundItem).where(RoundItem.round_id == round_id)) or 0
    per_item = (select(Assignment.item_id, func.count().label("n")).where(
        Assignment.round_id == round_id, Assignment.state == "done", Assignment.is_duplicate.is_(False))
        .group_by(Assignment.item_id).subquery())
    complete = session.scalar(select(func.count()).select_from(per_item).where(per_item.c.n >= rnd.overlap)) or 0
    n_j = session.scalar(select(func.count()).select_from(Judgement).where(Judgement.round_id == round_id)) or 0
    stats = session.execute(
        select(Rater.id, Rater.name,
               func.sum(case((Assignment.state == "done", 1), else_=0)),
               func.sum(case((and_(Assignment.state == "leased", Assignment.lease_expires_at >= now), 1), else_=0)),
               func.sum(case((and_(Assignment.state == "done", Assignment.is_duplicate.is_(True)), 1), else_=0)),
               func.sum(case((and_(Assignment.state == "leased", Assignment.lease_expires_at < now), 1), else_=0)))
        .join(Assignment, Assignment.rater_id == Rater.id)
        .where(Assignment.round_id == round_id).group_by(Rater.id, Rater.name).order_by(Rater.id)).all()
    times = dict(session.execute(select(Judgement.rater_id, func.sum(Judgement.time_on_task_s))
                                 .where(Judgement.round_id == round_id).group_by(Judgement.rater_id)).all())
    raters = tuple(RaterProgress(rid, name, int(d or 0), int(le or 0), int(dd or 0), float(times.get(rid) or 0.0),
                                 int(ex or 0)) for rid, name, d, le, dd, ex in stats)
    return RoundProgress(round_id, n_items, complete, n_j, raters)
